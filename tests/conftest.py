"""Fixtures shared by every test: real loopback backends, and the asyncio backend for anyio tests."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from meshlib.testing import Backend, Behavior
from tests.members import MEMBERS, Members

# Property tests check invariants, not speed: no per-example deadline, so a loaded CI machine (or a GC pause)
# cannot fail an example that is merely slow. Speed is measured in benchmarks/.
settings.register_profile("meshlib", deadline=None, print_blob=True)
settings.load_profile("meshlib")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run ``one_library`` tests once (on httpx) and ``slow`` ones only on request (markers: pyproject.toml).

    ``./dev.sh test`` runs the suite once per HTTP library; a parser or a balancer's arithmetic gives the same
    answer on both, so the httpx2 run deselects what is marked ``one_library`` (``MESHLIB_TEST_BOTH_LIBRARIES=1``
    keeps it). ``slow`` tests are skipped, with the variable to set named in the reason, unless
    ``MESHLIB_TEST_SLOW=1``.
    """
    library = os.environ.get("MESHLIB_HTTP_LIBRARY", "").strip().lower() or "httpx"
    if library != "httpx" and os.environ.get("MESHLIB_TEST_BOTH_LIBRARIES") != "1":
        deselected = [item for item in items if item.get_closest_marker("one_library") is not None]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.get_closest_marker("one_library") is None]
    if os.environ.get("MESHLIB_TEST_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow (opt-in): run with MESHLIB_TEST_SLOW=1")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(skip)


#: The threads of a client's control-plane sources: Consul's discovery chains (the apply thread, each chain's and
#: target's watch) and xDS (the apply thread, each ADS stream and its timer).
SOURCE_THREADS = ("meshlib-consul-chain", "meshlib-consul-target", "meshlib-xds")


@pytest.fixture(autouse=True)
def no_source_thread_outlives_its_test() -> Iterator[None]:
    """Fail the test that leaves a control-plane source running (a client neither closed nor collected), not a
    later one that happens to log, count threads or collect garbage meanwhile. Cheap: one look at the thread list
    (and a bounded join only when some are left, as a client closing in a fixture's teardown may still be)."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t.name.startswith(SOURCE_THREADS) and t not in before]
    if not left:
        return
    deadline = time.monotonic() + 10  # one bound for all: only "did not hang"
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sorted(t.name for t in left if t.is_alive())
    if alive:
        pytest.fail(
            f"control-plane source threads outlived the test: {alive} (close the client it made, or drop it and "
            "gc.collect() before the test ends)",
            pytrace=False,
        )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


BackendFactory = Callable[..., list[Backend]]


@pytest.fixture
def start_backends() -> Iterator[BackendFactory]:
    """``start_backends(n, behavior=..., prefix=...)`` starts n real HTTP backends on loopback, stopped after."""
    started: list[Backend] = []

    def start(n: int, behavior: Behavior | None = None, prefix: str = "b", **kwargs: object) -> list[Backend]:
        group = [Backend(f"{prefix}{i}", behavior=behavior or Behavior(), **kwargs).start() for i in range(n)]  # type: ignore[arg-type]
        started.extend(group)
        return group

    yield start
    for backend in started:
        backend.stop()


def static_target(backends: list[Backend]) -> str:
    """A ``static://`` target listing the given backends."""
    return "static://" + ",".join(b.address for b in backends)


class LogEvent(logging.Handler):
    """Sets an event when a log line containing ``needle`` is emitted: synchronisation without sleeping."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


LogWatch = Callable[[str], threading.Event]


@pytest.fixture
def log_event() -> Iterator[LogWatch]:
    """``log_event(needle)`` returns an event set when any ``meshlib`` logger emits a line containing it."""
    handlers: list[LogEvent] = []
    logger = logging.getLogger("meshlib")
    previous = logger.level
    logger.setLevel(logging.INFO)

    def watch(needle: str) -> threading.Event:
        handler = LogEvent(needle)
        handlers.append(handler)
        logger.addHandler(handler)
        return handler.event

    yield watch
    logger.setLevel(previous)
    for handler in handlers:
        logger.removeHandler(handler)


@pytest.fixture
def members(request: pytest.FixtureRequest) -> Iterator[Members]:
    """This test's ``test-members://`` discovery source (tests/members.py): an endpoint set it changes."""
    name = request.node.name.replace("[", "-").replace("]", "")
    MEMBERS[name] = found = Members(source=f"test-members://{name}")
    yield found
    del MEMBERS[name]
