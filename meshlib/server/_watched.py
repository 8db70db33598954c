"""What the inbound hooks that read a policy file share: loading it, watching it, reporting and closing it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from meshlib.control.file import FileSource, FileSourceStatus, FileVersion, report

T = TypeVar("T")


class WatchedFileHook(Generic[T]):
    """Base of a hook configured from a file: :meth:`_watch` loads it (an invalid first version is a
    :class:`~meshlib.ConfigError`), reports it in the admin endpoint's ``/status`` and starts the watcher, which
    calls ``publish`` with each later valid version."""

    source: FileSource[T] | None = None

    def _watch(
        self,
        file: str,
        parse: Callable[[bytes, str], T],
        publish: Callable[[Any, T, FileVersion], None],
        *,
        variable: str,
        interval: float,
        what: str,
    ) -> T:
        source: FileSource[T] = FileSource(
            file, parse, publish, owner=self, variable=variable, interval=interval, what=what
        )
        first = source.load_first()
        self.source = source
        report(source)  # shown in the admin endpoint's /status (``meshlib status``)
        source.start()
        return first

    def status(self) -> FileSourceStatus | None:
        """The watched file's state (version in use, rejected versions and why), or ``None`` without a file."""
        return None if self.source is None else self.source.status()

    def close(self) -> None:
        """Stop watching the file (if any)."""
        if self.source is not None:
            self.source.stop()
