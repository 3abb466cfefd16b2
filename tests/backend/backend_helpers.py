"""Helpers shared by the back-end tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def log_line(caplog, *words: str) -> str:
    """The first captured "iovirt" record containing every word (waits for the server threads)."""
    found: list[str] = []

    def seen() -> bool:
        for record in list(caplog.records):
            message = record.getMessage()
            if record.name.startswith("iovirt") and all(w in message for w in words):
                found.append(message)
                return True
        return False

    assert wait_until(seen), f"no log line with {words}; got {[r.getMessage() for r in caplog.records]}"
    return found[0]
