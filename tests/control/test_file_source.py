"""``meshlib.control.file.FileSource``: the hot-reloaded configuration file behind ``MESHLIB_ROUTES_FILE``.

Real files in ``tmp_path``, a real poll thread, no sleeps: a test either polls synchronously with
``check_now()`` (no thread started, so nothing else consumes the change), or starts the thread and waits on
``wait_change()`` with a generous timeout. The parser is a small JSON reader raising ``RoutesError``, as the
routes compiler does.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshlib.control.file import MAX_FILE_SIZE, FileSource, FileVersion
from meshlib.errors import ConfigError, RoutesError

pytestmark = pytest.mark.one_library

VARIABLE = "MESHLIB_ROUTES_FILE"
#: Generous: proves "did not hang", never a timing assertion.
WAIT = 30.0


def parse(data: bytes, source: str) -> int:
    """``{"v": <int>}`` -> the int; anything else is a RoutesError naming the source, as the routes compiler's."""
    try:
        document = json.loads(data)
    except ValueError as error:
        raise RoutesError(source, "", "", data[:40].decode(errors="replace"), f"a JSON document ({error})") from None
    value = document.get("v") if isinstance(document, dict) else None
    if not isinstance(value, int):
        raise RoutesError(source, "document 1", "v", value, "an integer")
    return value


class Owner:
    """What a client's mesh is to its source: it holds the value the source publishes."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.published: list[int] = []
        self.versions: list[FileVersion] = []


def publish(owner: Owner, value: int, version: FileVersion) -> None:
    owner.value = value
    owner.published.append(value)
    owner.versions.append(version)


def write(path: Path, content: bytes | str) -> None:
    """Replace ``path`` atomically (write a temporary file, then rename), as editors and Kubernetes do."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def doc(value: int) -> str:
    return json.dumps({"v": value})


def version_of(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()[:12]


def make(
    path: Path,
    *,
    interval: float = 3600.0,
    parser: Callable[[bytes, str], int] = parse,
    owner: Owner | None = None,
) -> tuple[FileSource[int], Owner]:
    """A source of ``path`` loaded once (its owner holding the first value), its thread not started."""
    owner = owner or Owner()
    source: FileSource[int] = FileSource(str(path), parser, publish, owner=owner, variable=VARIABLE, interval=interval)
    owner.value = source.load_first()
    return source, owner


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "meshlib.control" and r.levelno == level]


# -- start-up --------------------------------------------------------------------------------------------------


def test_first_load_returns_the_value_and_publishes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    assert owner.value == 1
    assert owner.published == []
    status = source.status()
    assert (status.version, status.applied, status.rejected, status.missing) == (version_of(doc(1)), 1, None, False)
    assert json.loads(json.dumps(status.to_dict()))["version"] == version_of(doc(1))


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: None, "an existing routes file (No such file or directory)"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b" " * (MAX_FILE_SIZE + 1)), "larger than 4 MiB"),
        (os.mkfifo, "is not a regular file"),  # refused, not waited on
        (lambda p: p.symlink_to(p.with_name("nowhere")), "an existing routes file"),  # dangling symlink
    ],
    ids=["missing", "directory", "too-big", "fifo", "dangling-symlink"],
)
def test_first_load_of_an_unusable_file_names_variable_and_path(
    tmp_path: Path, setup: Callable[[Path], None], expected: str
) -> None:
    path = tmp_path / "routes.json"
    setup(path)
    source: FileSource[int] = FileSource(str(path), parse, publish, owner=Owner(), variable=VARIABLE)
    with pytest.raises(ConfigError) as info:
        source.load_first()
    assert info.value.variable == VARIABLE
    assert info.value.value == str(path)
    assert f"{VARIABLE}={str(path)!r}" in str(info.value)
    assert expected in str(info.value)


def test_first_load_of_an_invalid_version_raises_the_parse_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, '{"v": "two"}')
    source: FileSource[int] = FileSource(str(path), parse, publish, owner=Owner(), variable=VARIABLE)
    with pytest.raises(RoutesError) as info:
        source.load_first()
    assert info.value.source == str(path)
    assert "'two'" in str(info.value)
    assert "an integer" in str(info.value)


# -- changes -----------------------------------------------------------------------------------------------------


def test_a_valid_change_is_applied_by_the_thread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshlib.control")
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path, interval=0.01)
    source.start()
    try:
        assert source.watching
        seen = source.changes
        write(path, doc(2))
        assert source.wait_change(seen, WAIT)
        assert owner.value == 2
        assert owner.versions[-1].version == version_of(doc(2))
        status = source.status()
        assert (status.version, status.applied, status.rejected) == (version_of(doc(2)), 2, None)
        assert f"routes file {path} version {version_of(doc(2))} applied" in caplog.text
    finally:
        source.stop()


def test_an_invalid_change_is_rejected_once_and_the_last_good_version_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    bad = '{"v": "oops"}'
    write(path, bad)
    assert source.check_now()
    assert owner.value == 1
    assert owner.published == []
    status = source.status()
    assert status.version == version_of(doc(1))
    assert status.rejected is not None
    assert status.rejected.version == version_of(bad)
    assert "'oops'" in status.rejected.error
    assert "an integer" in status.rejected.error
    assert status.rejections == 1
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert str(path) in message
    assert version_of(bad) in message
    assert "an integer" in message
    # Polled again, touched (same content, new mtime): no second ERROR.
    assert not source.check_now()
    os.utime(path, ns=(1, 1))
    assert not source.check_now()
    assert len(records(caplog, logging.ERROR)) == 1
    # Another bad version: its own ERROR.
    write(path, "not json")
    assert source.check_now()
    assert len(records(caplog, logging.ERROR)) == 2
    assert source.status().rejected.version == version_of("not json")  # type: ignore[union-attr]
    # A valid version clears the rejection.
    write(path, doc(3))
    assert source.check_now()
    assert owner.value == 3
    status = source.status()
    assert (status.version, status.rejected, status.rejections, status.applied) == (version_of(doc(3)), None, 2, 2)
    assert json.loads(json.dumps(status.to_dict()))["rejected"] is None


def test_going_back_to_the_version_in_use_clears_the_rejection(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    write(path, "{")
    assert source.check_now()
    assert source.status().rejected is not None
    write(path, doc(1))  # the bad edit undone
    assert source.check_now()
    assert source.status().rejected is None
    assert owner.published == []  # nothing new to apply
    assert source.status().applied == 1


def test_a_parser_bug_or_a_failed_publish_is_a_rejection_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))

    def buggy_parse(data: bytes, source: str) -> int:
        value = parse(data, source)
        if value == 2:
            raise TypeError("a bug in the parser")
        return value

    def failing_publish(owner: Owner, value: int, version: FileVersion) -> None:
        if value == 3:
            raise RuntimeError("cannot apply")
        publish(owner, value, version)

    owner = Owner()
    source: FileSource[int] = FileSource(
        str(path), buggy_parse, failing_publish, owner=owner, variable=VARIABLE, interval=3600
    )
    owner.value = source.load_first()
    for value, error in (
        (2, "TypeError: a bug in the parser"),
        (3, "applying it failed: RuntimeError('cannot apply')"),
    ):
        write(path, doc(value))
        assert source.check_now()
        rejected = source.status().rejected
        assert rejected is not None
        assert rejected.error == error
        assert owner.value == 1
        assert source.status().version == version_of(doc(1))
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 2
    assert all(record.exc_info is not None for record in errors)


def test_an_oversized_change_is_rejected_without_a_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    write(path, b" " * (MAX_FILE_SIZE + 1))
    assert source.check_now()
    assert not source.check_now()
    rejected = source.status().rejected
    assert rejected is not None
    assert rejected.version is None
    assert "larger than 4 MiB" in rejected.error
    assert len(records(caplog, logging.ERROR)) == 1
    assert owner.value == 1


def test_an_in_place_rewrite_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    inode = path.stat().st_ino
    path.write_text(doc(2))  # same inode, same size: only the content (and maybe not even the mtime) differs
    assert path.stat().st_ino == inode
    assert source.check_now()
    assert owner.value == 2


def test_a_rewrite_within_one_timestamp_tick_is_picked_up(tmp_path: Path) -> None:
    """Same inode, same size, same mtime (two writes within one tick of the file system's clock): the stat
    signature cannot tell, so a file modified recently is read again (and hashed) at every poll."""
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    before = path.stat()
    path.write_text(doc(2))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert source.check_now()
    assert owner.value == 2


def test_an_old_unchanged_signature_is_trusted(tmp_path: Path) -> None:
    """Once its mtime is older than the racy window, an unchanged signature is believed: one stat, no read.

    (Shown by a content change hidden behind a restored, old mtime, which is then not seen: the cost of not
    reading the file at every poll, and why files must be replaced, not edited with their mtime reset.)
    """
    path = tmp_path / "routes.json"
    write(path, doc(1))
    os.utime(path, ns=(10**18, 10**18))  # 2001
    source, owner = make(path)
    path.write_text(doc(2))
    os.utime(path, ns=(10**18, 10**18))
    assert not source.check_now()
    assert owner.value == 1
    os.utime(path)  # now: a real change of signature
    assert source.check_now()
    assert owner.value == 2


def test_an_atomic_rename_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    inode = path.stat().st_ino
    write(path, doc(22))
    assert path.stat().st_ino != inode
    assert source.check_now()
    assert owner.value == 22


def test_a_kubernetes_configmap_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    """kubelet's AtomicWriter: ``routes.json -> ..data/routes.json``, ``..data -> ..<timestamp>``; an update
    writes a new timestamped directory and renames a new ``..data`` symlink over the old one."""
    first = tmp_path / "..2024_01_01_00_00_00.1"
    first.mkdir()
    (first / "routes.json").write_text(doc(1))
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "routes.json"
    path.symlink_to("..data/routes.json")
    source, owner = make(path)
    assert owner.value == 1

    second = tmp_path / "..2024_01_01_00_01_00.2"
    second.mkdir()
    (second / "routes.json").write_text(doc(2))
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    (first / "routes.json").unlink()
    first.rmdir()

    assert source.check_now()
    assert owner.value == 2
    assert source.status().version == version_of(doc(2))


def test_a_deleted_file_keeps_the_last_good_version_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    path.unlink()
    assert not source.check_now()
    assert not source.check_now()
    assert source.status().missing
    assert source.status().version == version_of(doc(1))
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert owner.value == 1
    # Back with the same content: nothing to apply.
    write(path, doc(1))
    assert not source.check_now()
    assert not source.status().missing
    # Gone again, back with a new version: applied.
    path.unlink()
    assert not source.check_now()
    write(path, doc(2))
    assert source.check_now()
    assert owner.value == 2
    assert not source.status().missing
    assert records(caplog, logging.ERROR) == []


def test_a_file_changing_while_it_is_read_is_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A writer still writing: the version read is torn (invalid) and the file changes under the poll.

    The parser plays the writer: when it is handed the first half, the rest is appended to the file (in
    place, as a non-atomic writer does) before the half is refused. No ERROR, no rejection; the next poll
    applies the whole version.
    """
    path = tmp_path / "routes.json"
    write(path, doc(1))
    whole = doc(2)
    half, rest = whole[:4], whole[4:]

    def writer_racing_parse(data: bytes, source: str) -> int:
        if data == half.encode():
            with path.open("a") as file:
                file.write(rest)
        return parse(data, source)

    source, owner = make(path, parser=writer_racing_parse)
    path.write_text(half)
    assert not source.check_now()
    assert records(caplog, logging.ERROR) == []
    assert source.status().rejected is None
    assert owner.value == 1
    assert source.check_now()
    assert owner.value == 2
    assert records(caplog, logging.ERROR) == []


def test_a_file_replaced_while_it_is_parsed_is_not_published(tmp_path: Path) -> None:
    """A valid version replaced during its parse is dropped (the newer one is read next), never published."""
    path = tmp_path / "routes.json"
    write(path, doc(1))

    def replaced_during_parse(data: bytes, source: str) -> int:
        value = parse(data, source)
        if value == 2:
            write(path, doc(3))
        return value

    source, owner = make(path, parser=replaced_during_parse)
    write(path, doc(2))
    assert not source.check_now()
    assert owner.published == []
    assert source.check_now()
    assert owner.published == [3]


# -- the thread ---------------------------------------------------------------------------------------------------


def test_stop_ends_the_thread_for_good(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, _ = make(path)  # an hour's interval: only stop() can end the wait promptly
    source.start()
    thread = source._thread
    assert thread is not None and thread.is_alive()
    source.stop()
    assert not thread.is_alive()
    assert not source.watching
    source.start()
    assert not source.watching


def test_the_thread_ends_when_its_owner_is_collected(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)  # an hour's interval: the owner's collection must wake the thread
    source.start()
    thread = source._thread
    assert thread is not None and thread.is_alive()
    del owner
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert source.status().watching is False


def test_the_thread_ends_when_its_source_is_collected(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path)
    source.start()
    thread = source._thread
    assert thread is not None
    del source
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert owner.value == 1


def test_interval_zero_never_starts_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path, interval=0)
    source.start()
    assert not source.watching
    write(path, doc(2))
    assert source.check_now()  # explicit checks still work
    assert owner.value == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX-only")
def test_a_forked_child_watches_with_its_own_thread(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(1))
    source, owner = make(path, interval=0.01)
    source.start()
    try:
        read, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own thread, which applies a change made here
            report: dict[str, Any] = {}
            try:
                os.close(read)
                report["watching"] = source.watching
                seen = source.changes
                write(path, doc(7))
                report["changed"] = source.wait_change(seen, WAIT)
                report["value"] = owner.value
            except BaseException as exc:
                report["error"] = repr(exc)
            finally:
                os.write(write_end, json.dumps(report).encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read, "rb") as pipe:
            report = json.loads(pipe.read() or b"{}")
        os.waitpid(pid, 0)
        assert report == {"watching": True, "changed": True, "value": 7}
        assert source.watching  # the parent's thread goes on
        source.restart_after_fork()  # idempotent in the process that has its thread
        assert source.watching
    finally:
        source.stop()


# -- concurrency --------------------------------------------------------------------------------------------------


def test_concurrent_polls_never_publish_an_older_version_after_a_newer_one(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    write(path, doc(0))
    source, owner = make(path, interval=0.001)
    source.start()  # the thread polls too, alongside the checkers below
    last = 300
    done = threading.Event()
    failures: list[BaseException] = []

    def checker() -> None:
        try:
            while not done.is_set():
                source.check_now()
        except BaseException as exc:
            failures.append(exc)

    checkers = [threading.Thread(target=checker) for _ in range(4)]
    for thread in checkers:
        thread.start()
    try:
        for value in range(1, last + 1):
            write(path, doc(value))
    finally:
        done.set()
        for thread in checkers:
            thread.join(WAIT)
    source.check_now()  # whatever the last polls saw, the newest version is now in
    source.stop()
    assert failures == []
    assert owner.published == sorted(set(owner.published)), "a version was published after a newer one"
    assert owner.value == last
    assert owner.published[-1] == last
