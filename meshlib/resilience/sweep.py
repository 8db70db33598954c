"""The interval timer of rate-based outlier ejection: one daemon thread per client for all its services.

Success-rate and failure-percentage ejection (:meth:`OutlierDetector.evaluate
<meshlib.resilience.outlier.OutlierDetector.evaluate>`) run once per ``interval`` per service, off the request
path (gRFC A50's timer, Envoy's ``onIntervalTimer``). A client keeps one :class:`OutlierSweep`; its thread starts
when the first service that needs it is watched (:meth:`OutlierSweep.watch`: a service whose rate detectors are
on and which has at least their ``minimum_hosts`` endpoints), so a client whose services are small, or that
turned both detectors off, runs no thread. Each detector keeps its own interval; the thread sleeps until the
earliest one is due.

Why a thread for the async client too: ``evaluate()`` is a few microseconds of arithmetic under the detector's
own lock and does no I/O, so it needs no event loop, works the same under asyncio and trio, and keeps sweeping
while the loop is busy; the routes file watcher does the same.

Ownership: the thread holds its owner (the mesh) weakly and the detectors weakly, so a client dropped without
``close()`` is collected (its finalizer calls :meth:`halt`, and the thread also ends at its next wake-up once
the owner is gone), and a service the client released stops being swept. Across ``os.fork()`` the thread does
not exist in the child: the mesh makes a new sweep there, which starts when the child's services are watched.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from meshlib.resilience.outlier import OutlierDetector

__all__ = ["OutlierSweep"]

logger = logging.getLogger("meshlib.resilience")

#: How long :meth:`OutlierSweep.stop` waits for the thread (it only waits on an event and does arithmetic).
JOIN_TIMEOUT = 5.0
#: The shortest sleep between two wake-ups, so a clock that does not move cannot make the thread spin.
MIN_WAIT = 0.001


class OutlierSweep:
    """Calls :meth:`~meshlib.resilience.outlier.OutlierDetector.evaluate` of each watched detector every
    ``detector.interval`` seconds (read on ``detector.clock``, so a fake clock drives it in tests).

    Thread-safe: :meth:`watch` from any thread (a refresh thread, the event loop), :meth:`sweep` from the
    thread or a test. Each due detector is evaluated once per interval, whoever calls :meth:`sweep`.
    """

    def __init__(self, owner: object, name: str = "meshlib-outlier") -> None:
        self._owner = weakref.ref(owner)
        self._name = name
        self._lock = threading.Lock()
        #: Watched detectors -> when (on their clock) their next sweep is due.
        self._due: weakref.WeakKeyDictionary[OutlierDetector[Any], float] = weakref.WeakKeyDictionary()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: Sweeps run (detector evaluations), for status and tests.
        self.sweeps = 0

    @property
    def running(self) -> bool:
        """Whether the thread is running."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def watch(self, detector: OutlierDetector[Any]) -> None:
        """Sweep ``detector`` every interval from now on (idempotent); starts the thread on first use."""
        if detector in self._due:
            return
        with self._lock:
            if self._stopped or detector in self._due:
                return
            self._due[detector] = detector.clock() + detector.interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.set()  # recompute the sleep: this one may be due before the others

    def sweep(self) -> float | None:
        """Evaluate every watched detector whose interval is over; seconds until the next one is due (``None``:
        none watched). The thread's loop; tests call it directly after moving the detectors' fake clock."""
        with self._lock:  # held for the evaluations: two sweeps never evaluate one detector twice
            wait: float | None = None
            for detector, when in list(self._due.items()):
                now = detector.clock()
                due = when
                if now >= due:
                    try:
                        detector.evaluate()
                    except Exception:  # a bug in one service's sweep must not end every other's
                        logger.exception("outlier sweep of %r failed", detector)
                    self.sweeps += 1
                    due = self._due[detector] = now + detector.interval
                left = due - now
                wait = left if wait is None else min(wait, left)
            return wait

    def _run(self) -> None:
        while True:
            if self._stopped or self._owner() is None:
                return
            wait = self.sweep()
            self._wake.wait(None if wait is None else max(wait, MIN_WAIT))
            self._wake.clear()

    def halt(self) -> None:
        """Ask the thread to end without waiting for it (safe from a finalizer, on any thread)."""
        self._stopped = True
        self._wake.set()

    def stop(self) -> None:
        """Ask the thread to end and wait for it (bounded)."""
        self.halt()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
