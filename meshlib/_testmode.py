"""The process-wide testing switch, read by the request path (set through :func:`meshlib.testing.set_testing`).

Its own module, with nothing in it but the switch, so the request path reads one attribute of one object and
imports nothing else for it. Global on purpose and only for tests, like stamina's ``set_testing``: a user's
test suite turns it on once (or per test) for every meshlib client in the process.
"""

from __future__ import annotations

__all__ = ["MODE", "TestingMode"]


class TestingMode:
    """What testing mode is now. ``enabled`` is read per call; ``attempts`` caps each call's attempts."""

    __slots__ = ("attempts", "enabled")

    def __init__(self) -> None:
        self.enabled = False
        self.attempts = 1


#: The one switch of the process.
MODE = TestingMode()
