"""``python -m iovirt``."""

import sys

from iovirt.cli import main

sys.exit(main())
