"""A configuration file watched off the request path and hot-reloaded: :class:`FileSource`.

``MESHLIB_ROUTES_FILE`` (and later ``MESHLIB_AUTHZ_FILE``) name a file an operator edits, or that Kubernetes
mounts from a ConfigMap. Its owner (the client's mesh) gets whole versions of it, each validated by the
owner's ``parse`` before it is handed over, and swaps each one in with one attribute assignment: a request
runs on the version it started with, never on half of one.

**Start-up.** :meth:`FileSource.load_first` reads and parses the file at client construction: a missing,
unreadable, non-regular or too large file (over :data:`MAX_FILE_SIZE`) is a :class:`~meshlib.ConfigError`
naming the variable, the path and what was expected; an invalid version raises ``parse``'s own error
(a :class:`~meshlib.errors.RoutesError` names the document and field).

**Watching.** :meth:`FileSource.start` runs one daemon thread that, every ``interval`` seconds:

1. ``os.stat()``\\ s the path, following symlinks (a Kubernetes ConfigMap volume swaps its ``..data`` symlink
   to a new directory: the path then resolves to a new inode), and compares (mtime, size, inode, device)
   with the version it has. Unchanged: nothing more is done. A file whose mtime was less than
   :data:`RACY_WINDOW` old when it was read is read again at the next poll whatever its signature says
   (git's "racy" rule): two writes of the same size within one timestamp tick of the file system, with an
   inode number reused by the rename, would otherwise look unchanged for good.
2. Reads it (a regular file of at most 4 MiB; opened non-blocking, so a FIFO put there cannot hang the
   thread), hashes it (SHA-256; a version is named by its first 12 hex digits), and stops if the content is
   the version in use, or the version already rejected.
3. Parses it, then ``stat()``\\ s the path again: if the file changed since it was opened (a writer was still
   writing, or replaced it), the round is dropped without a word and the next poll reads the newer file.
4. Valid: ``publish(owner, value, version)``, and an INFO line ``routes file X version V applied``.
   Invalid: the version in use keeps serving; one ERROR line names the file, the version and the error (once
   per distinct bad version, not at every poll), and :meth:`FileSource.status` shows it as ``rejected``
   until a later version is applied (as an xDS NACK would).

A file that disappears leaves the last good version serving (one WARNING); when it comes back it is read
again. Replace files atomically (write elsewhere, then rename, as Kubernetes does); an in-place write that
pauses half-way may be rejected once and applied when it is complete.

**Threads.** Polls (by the thread or :meth:`FileSource.check_now`) take turns on one lock, held for the
whole poll including ``publish``: versions are published in the order they were read, so an older version is
never published after a newer one. ``publish`` must therefore be quick (an attribute swap) and must not call
back into the source. The thread holds the source and its owner weakly: a client dropped without
``close()`` is collected and its thread ends at once (a weak reference callback wakes it).
:meth:`FileSource.stop` ends it promptly. After ``os.fork()`` the child has no thread: every source of the
process gets new locks and, if it was watching, a new thread, from an at-fork hook of this module
(:meth:`FileSource.restart_after_fork` does the same and is idempotent, for owners that prefer to call it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from meshlib.errors import ConfigError

__all__ = ["MAX_FILE_SIZE", "RACY_WINDOW", "FileSource", "FileSourceStatus", "FileVersion", "RejectedVersion"]

logger = logging.getLogger("meshlib.control")

T = TypeVar("T")

#: The largest file accepted (4 MiB): a routes table of thousands of rules is well under it; a bigger file is
#: a mistake (a log written to the wrong path) and would cost its parse time and memory at every version.
MAX_FILE_SIZE = 4 * 1024 * 1024
#: A file modified less than this many seconds before it was read is read again at the next poll even if its
#: ``stat()`` looks the same (see the module docstring): file system timestamps may be as coarse as a few
#: milliseconds (a kernel tick), and NFS clocks drift; two seconds covers both.
RACY_WINDOW = 2.0
#: How long :meth:`FileSource.stop` waits for a poll in progress (a parse of a big file) before giving up.
JOIN_TIMEOUT = 5.0
#: At start-up, how many times a file that changes while it is read is read again before its last read is used.
FIRST_LOAD_ATTEMPTS = 5

#: (mtime_ns, size, inode, device) of a file: what says it may have changed.
_Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _wall(seconds: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC with milliseconds (``None`` stays ``None``), for status output."""
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One version of a watched file: ``version`` is the first 12 hex digits of its SHA-256 (``sha256``)."""

    path: str
    version: str
    sha256: str
    size: int
    #: When it was loaded (wall clock, seconds since the epoch).
    loaded_at: float

    def to_dict(self) -> dict[str, object]:
        """Plain JSON types (``loaded_at`` as ISO 8601 UTC)."""
        return {
            "path": self.path,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "loaded_at": _wall(self.loaded_at),
        }


@dataclass(frozen=True, slots=True)
class RejectedVersion:
    """A version that was not applied: its ``version`` (``None`` when its content could not be read: too
    large, not a regular file, no permission), the ``error`` saying why, and when (``at``, wall clock)."""

    version: str | None
    error: str
    at: float

    def to_dict(self) -> dict[str, object]:
        """Plain JSON types (``at`` as ISO 8601 UTC)."""
        return {"version": self.version, "error": self.error, "at": _wall(self.at)}


@dataclass(frozen=True, slots=True)
class FileSourceStatus:
    """A snapshot of one watched file, for ``mesh_status()`` (:meth:`to_dict`) and tests.

    ``version``/``loaded_at``: the version serving (``None`` before the first load); ``applied``: versions
    applied, the first load included; ``rejected``: the newest version refused since the last one applied
    (``None`` once a newer version is applied); ``rejections``: how many were ever refused; ``missing``: the
    file is gone right now (the last good version keeps serving); ``watching``: the poll thread is running.
    """

    what: str
    variable: str
    path: str
    interval: float
    version: str | None
    loaded_at: float | None
    applied: int
    rejected: RejectedVersion | None
    rejections: int
    last_checked: float | None
    missing: bool
    watching: bool

    def to_dict(self) -> dict[str, object]:
        """Plain JSON types (times as ISO 8601 UTC strings), ready for ``json.dumps``."""
        return {
            "what": self.what,
            "variable": self.variable,
            "path": self.path,
            "interval_s": self.interval,
            "version": self.version,
            "loaded_at": _wall(self.loaded_at),
            "applied": self.applied,
            "rejected": None if self.rejected is None else self.rejected.to_dict(),
            "rejections": self.rejections,
            "last_checked": _wall(self.last_checked),
            "missing": self.missing,
            "watching": self.watching,
        }


class _Unusable(Exception):
    """The path exists but holds no readable version: not a regular file, too large, or not readable."""


def _read(path: str) -> tuple[bytes, os.stat_result]:
    """The content of ``path`` (symlinks followed) and the ``fstat()`` of what was read.

    ``FileNotFoundError`` when it does not exist (a dangling symlink included); :class:`_Unusable` saying why
    for anything else that is not a regular file of at most :data:`MAX_FILE_SIZE` bytes that can be read.
    Opened with ``O_NONBLOCK``: a FIFO or device at the path is refused, not waited on.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise _Unusable(f"cannot be opened ({error.strerror or error})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _Unusable("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise _Unusable("is not a regular file")
        too_big = f"is larger than {MAX_FILE_SIZE // (1024 * 1024)} MiB"
        if st.st_size > MAX_FILE_SIZE:
            raise _Unusable(f"{too_big} ({st.st_size} bytes)")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, MAX_FILE_SIZE + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_FILE_SIZE:
                raise _Unusable(too_big)
        return b"".join(chunks), st
    except OSError as error:
        raise _Unusable(f"cannot be read ({error.strerror or error})") from None
    finally:
        os.close(fd)


def _wake_on_collect(source_ref: weakref.ref[FileSource[Any]]) -> Callable[[object], None]:
    """The callback of the owner's weak reference: its owner collected, the source's thread ends at once.

    Refers to the source weakly (its stop event is replaced after a fork, so it is looked up when called).
    """

    def wake(_: object) -> None:
        source = source_ref()
        if source is not None:
            source.halt()

    return wake


def _watch(source_ref: weakref.ref[FileSource[Any]], stop: threading.Event, interval: float) -> None:
    """The poll thread: one poll every ``interval`` seconds until ``stop`` is set or the source is gone."""
    while not stop.wait(interval):
        if not _poll_once(source_ref):
            return


def _poll_once(source_ref: weakref.ref[FileSource[Any]]) -> bool:
    """One poll; ``False`` when the source or its owner is gone. (Its own frame: no reference survives it.)"""
    source = source_ref()
    if source is None or source._owner() is None:
        return False
    try:
        source._poll()
    except Exception:  # a bug must not end reloading for good: log it, poll again next time
        logger.exception("checking %s file %s failed", source.what, source.path)
    return True


class FileSource(Generic[T]):
    """Watches the file at ``path`` and hands each new valid version to ``publish`` (see the module docstring).

    ``parse(data, source)`` turns the file's bytes into a value (``source`` is the path, for its error
    messages) or raises :class:`~meshlib.ConfigError` (or its subclass ``RoutesError``) for an invalid
    version. ``publish(owner, value, version)`` swaps a new value in; the source holds ``owner`` weakly and
    passes it dereferenced for that call alone (``publish`` itself must not refer to the owner, or the owner
    is never collected). ``variable`` is the setting that named the file (``MESHLIB_ROUTES_FILE``), for
    errors; ``what`` names the content in log lines and the thread's name (``routes``); ``interval`` is the
    poll period in seconds, 0 for never (loaded once).
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[bytes, str], T],
        publish: Callable[[Any, T, FileVersion], None],
        *,
        owner: object,
        variable: str,
        interval: float = 1.0,
        what: str = "routes",
    ) -> None:
        self.path = path
        self.variable = variable
        self.interval = interval
        self.what = what
        self._parse = parse
        self._publish = publish
        self._owner = weakref.ref(owner, _wake_on_collect(weakref.ref(self)))
        # State below is written under _lock only (by the poll thread or check_now).
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._current: FileVersion | None = None
        self._signature: _Signature | None = None
        #: Whether ``_signature`` may be trusted to say "unchanged" (False while the file is "racy").
        self._trusted = False
        self._rejected: RejectedVersion | None = None
        #: What the rejected version was recognised by: its SHA-256, or the signature of an unreadable file.
        self._rejected_key: object = None
        self._applied = 0
        self._rejections = 0
        self._changes = 0
        self._last_checked: float | None = None
        self._missing = False
        # A source dropped while its owner lives (replaced, say) ends its thread too: refers to the event only.
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._finalizer.atexit = False
        _SOURCES.add(self)

    # -- start-up ------------------------------------------------------------------------------------------

    def load_first(self) -> T:
        """Read and parse the file now, on the caller's thread, and return its value (nothing is published).

        The version becomes the current one (``status().applied`` is 1). A file that cannot be used is a
        :class:`~meshlib.ConfigError` naming :attr:`variable`, the path and what was expected; ``parse``'s own
        error propagates unchanged. A file that changes while it is read is read again (a few times).
        """
        with self._lock:
            for attempt in range(1, FIRST_LOAD_ATTEMPTS + 1):
                try:
                    data, st = _read(self.path)
                except FileNotFoundError as error:
                    expected = f"an existing {self.what} file ({error.strerror or 'not found'})"
                    raise ConfigError(self.variable, self.path, expected) from None
                except _Unusable as error:
                    expected = f"a readable regular {self.what} file of at most 4 MiB, but it {error}"
                    raise ConfigError(self.variable, self.path, expected) from None
                signature = _signature(st)
                try:
                    value = self._parse(data, self.path)
                except ConfigError:
                    if attempt < FIRST_LOAD_ATTEMPTS and self._changed_since(signature):
                        continue  # caught mid-write: read the newer file
                    raise
                if attempt == FIRST_LOAD_ATTEMPTS or not self._changed_since(signature):
                    break
            now = time.time()
            self._last_checked = now
            version = self._version(data, now)
            self._applied_version(version, signature, now, "loaded")
            return value

    # -- watching ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the poll thread, once per process (no-op with ``interval`` 0, after :meth:`stop`, or if running)."""
        if self.interval <= 0:
            return
        with self._start_lock:
            if self._stop.is_set():
                return
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=_watch,
                args=(weakref.ref(self), self._stop, self.interval),
                name=f"meshlib-{self.what}-file",
                daemon=True,
            )
            self._thread.start()

    def halt(self) -> None:
        """Ask the thread to end, without waiting (safe from a finalizer, on any thread). Final: no restart."""
        self._stop.set()

    def stop(self) -> None:
        """End the thread and wait for it (bounded by :data:`JOIN_TIMEOUT` if a poll is parsing a big file)."""
        self.halt()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(JOIN_TIMEOUT)

    @property
    def watching(self) -> bool:
        """Whether the poll thread is running in this process."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == os.getpid()

    def restart_after_fork(self) -> None:
        """In a forked child: new locks and, if the parent's source was watching, a new thread. Idempotent.

        The module's at-fork hook calls it for every source of the process, so owners need not; calling it
        again in the same process does nothing.
        """
        if self._pid == os.getpid():
            return
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._start_lock = threading.Lock()
        stopped = self._stop.is_set()
        was_watching = self._thread is not None and not stopped
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._finalizer.atexit = False
        self._thread = None
        self._pid = os.getpid()
        if was_watching:
            self.start()

    def check_now(self) -> bool:
        """One poll, now, on the caller's thread; ``True`` if a version was applied or rejected (or a rejection
        ended because the file went back to the version in use).

        Takes turns with the poll thread (one lock), so the two never publish out of order.
        """
        return self._poll()

    @property
    def changes(self) -> int:
        """How many versions were applied or rejected so far (the first load included): for :meth:`wait_change`."""
        return self._changes

    def wait_change(self, after: int, timeout: float) -> bool:
        """Block until :attr:`changes` exceeds ``after``; ``False`` if ``timeout`` seconds ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._changes > after, timeout)

    def status(self) -> FileSourceStatus:
        """A snapshot of the file's state (read without the poll lock: fields may straddle a poll)."""
        current = self._current
        return FileSourceStatus(
            what=self.what,
            variable=self.variable,
            path=self.path,
            interval=self.interval,
            version=None if current is None else current.version,
            loaded_at=None if current is None else current.loaded_at,
            applied=self._applied,
            rejected=self._rejected,
            rejections=self._rejections,
            last_checked=self._last_checked,
            missing=self._missing,
            watching=self.watching,
        )

    @property
    def current(self) -> FileVersion | None:
        """The version in use (``None`` before the first load)."""
        return self._current

    # -- one poll (under _lock) ----------------------------------------------------------------------------

    def _poll(self) -> bool:
        with self._lock:
            now = time.time()
            self._last_checked = now
            try:
                st = os.stat(self.path)
            except OSError as error:
                self._gone(error)
                return False
            if self._missing:
                self._missing = False
                logger.info("%s file %s is back", self.what, self.path)
            signature = _signature(st)
            if signature == self._signature and self._trusted:
                return False
            return self._load(signature, now)

    def _load(self, seen: _Signature, now: float) -> bool:
        try:
            data, st = _read(self.path)
        except FileNotFoundError as error:
            self._gone(error)
            return False
        except _Unusable as error:
            if self._changed_since(seen):
                return False  # being replaced: the next poll looks at the new file
            return self._reject(None, ("unusable", seen), f"{self.what} file {self.path} {error}", seen, now)
        signature = _signature(st)
        digest = hashlib.sha256(data).hexdigest()
        current = self._current
        if current is not None and digest == current.sha256:
            if self._changed_since(signature):
                return False
            self._remember(signature, now)
            if self._rejected is None:
                return False
            # Back to the version in use (a bad edit undone): nothing is rejected any more.
            self._rejected = self._rejected_key = None
            logger.info("%s file %s is back to version %s, which is in use", self.what, self.path, current.version)
            self._changed_one()
            return True
        if digest == self._rejected_key:
            if not self._changed_since(signature):
                self._remember(signature, now)
            return False
        try:
            value = self._parse(data, self.path)
        except Exception as error:
            if self._changed_since(signature):
                logger.debug("%s file %s changed while it was read: reading it again", self.what, self.path)
                return False
            if isinstance(error, ConfigError):
                return self._reject(digest[:12], digest, str(error), signature, now)
            # Not a ConfigError: a bug of the parser, not of the file. Rejected all the same, with its traceback.
            return self._reject(digest[:12], digest, f"{type(error).__name__}: {error}", signature, now, exc=error)
        if self._changed_since(signature):
            logger.debug("%s file %s changed while it was read: reading it again", self.what, self.path)
            return False
        version = self._version(data, now, digest)
        owner = self._owner()
        if owner is None:
            self.halt()
            return False
        try:
            self._publish(owner, value, version)
        except Exception as error:
            return self._reject(version.version, digest, f"applying it failed: {error!r}", signature, now, exc=error)
        finally:
            del owner
        self._applied_version(version, signature, now, "applied")
        return True

    def _version(self, data: bytes, now: float, digest: str | None = None) -> FileVersion:
        digest = digest or hashlib.sha256(data).hexdigest()
        return FileVersion(path=self.path, version=digest[:12], sha256=digest, size=len(data), loaded_at=now)

    def _applied_version(self, version: FileVersion, signature: _Signature, now: float, verb: str) -> None:
        """``version`` is in use: record it, log it, then wake :meth:`wait_change` (which may read the log)."""
        self._current = version
        self._rejected = self._rejected_key = None
        self._applied += 1
        self._remember(signature, now)
        logger.info("%s file %s version %s %s", self.what, self.path, version.version, verb)
        self._changed_one()

    def _reject(
        self,
        version: str | None,
        key: object,
        error: str,
        signature: _Signature,
        now: float,
        *,
        exc: BaseException | None = None,
    ) -> bool:
        """Keep the version in use; log and record ``error`` once per distinct bad version (``key``).

        ``exc``: an unexpected exception (not a ``ConfigError``), whose traceback goes with the ERROR line.
        """
        self._remember(signature, now)
        if key == self._rejected_key:
            return False
        self._rejected_key = key
        self._rejected = RejectedVersion(version=version, error=error, at=now)
        self._rejections += 1
        serving = "nothing" if self._current is None else f"version {self._current.version}"
        logger.error(
            "%s file %s version %s rejected; %s stays in use: %s",
            self.what,
            self.path,
            version or "(unreadable)",
            serving,
            error,
            exc_info=exc,
        )
        self._changed_one()
        return True

    def _remember(self, signature: _Signature, now: float) -> None:
        """``signature`` is the version seen; trusted to mean "unchanged" only once its mtime is old enough."""
        self._signature = signature
        self._trusted = now - signature[0] / 1e9 >= RACY_WINDOW

    def _gone(self, error: OSError) -> None:
        self._signature = None
        if not self._missing:
            self._missing = True
            serving = "nothing" if self._current is None else f"version {self._current.version}"
            logger.warning(
                "%s file %s cannot be found (%s); %s stays in use until it is back",
                self.what,
                self.path,
                error.strerror or error,
                serving,
            )

    def _changed_since(self, signature: _Signature) -> bool:
        """Whether the path now names something other than the file version ``signature`` describes."""
        try:
            return _signature(os.stat(self.path)) != signature
        except OSError:
            return True

    def _changed_one(self) -> None:
        with self._changed:
            self._changes += 1
            self._changed.notify_all()


#: Every file source of this process, for the fork hook (weakly: it keeps none alive).
_SOURCES: weakref.WeakSet[FileSource[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for source in list(_SOURCES):
        try:
            source.restart_after_fork()
        except Exception:  # never let one source stop the others from restarting
            logger.exception("restarting the %s file watch after fork() failed", source.what)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- files the admin endpoint reports ---------------------------------------------------------------------------

_reported: weakref.WeakSet[FileSource[Any]] = weakref.WeakSet()
_reported_lock = threading.Lock()


def report(source: FileSource[Any]) -> None:
    """List ``source`` in the admin endpoint's ``/status`` (``inbound``) for as long as it lives.

    For files that belong to no client (the inbound middleware's policy files); a client's routes file is
    reported with the client. Held weakly: a source that is collected disappears from the list.
    """
    with _reported_lock:
        _reported.add(source)


def reported() -> list[FileSourceStatus]:
    """The state of every source passed to :func:`report` that is still alive, by path."""
    with _reported_lock:
        sources = list(_reported)
    return sorted((source.status() for source in sources), key=lambda status: (status.path, status.what))
