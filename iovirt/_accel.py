"""Which implementation of the accelerated parts runs, and whether it must.

``IOVIRT_NO_EXTENSIONS=1`` forces the pure-Python reference everywhere.
``IOVIRT_REQUIRE_EXTENSIONS=1`` (set by the test runner and CI) turns a
compiled extension that failed to load into an error instead of a silent
fallback (the yarl/multidict guard).
"""

from __future__ import annotations

import os

NO_EXTENSIONS = os.environ.get("IOVIRT_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXTENSIONS = os.environ.get("IOVIRT_REQUIRE_EXTENSIONS", "") not in ("", "0")
