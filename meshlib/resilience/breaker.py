"""Per-endpoint circuit breakers: stop sending to an endpoint that keeps failing, probe it now and then.

An :class:`EndpointBreaker` is *closed* (requests flow) until ``fail_max`` consecutive failures (as
classified by :mod:`meshlib.resilience.classify`: 5xx, connection failures, timeouts) trip it *open*. While
open, :meth:`~EndpointBreaker.allow` refuses at once, so the balancer skips the endpoint and nothing waits
on it. After a penalty it turns *half-open* and lets exactly **one** probe through; the probe's success
closes the breaker, its failure re-opens it with a longer penalty.

Defaults and their sources:

* ``fail_max=5`` consecutive failures: Finagle ``FailureAccrualFactory`` (``consecutiveFailures(5, ...)``),
  Linkerd 1.x failure accrual, Envoy ``outlier_detection.consecutive_5xx``.
* penalty ``reset_timeout=1 s`` (the class default; meshlib's clients pass ``MESHLIB_BREAKER_RESET``, 10 s)
  doubling on every failed probe up to ``max_reset_timeout=60 s``, each
  stretched by up to ``jitter=0.5`` (50 %): linkerd2-proxy's consecutive-failure accrual
  (``failure-accrual-consecutive-min-penalty: 1s``, ``max-penalty: 1m``, ``jitter-ratio: 0.5``). A short
  first penalty finds a blip's end quickly; the doubling keeps a dead endpoint from being probed more than
  about once a minute; the jitter keeps many clients from probing in lockstep. The longer, coarser
  "take it out of rotation" job belongs to outlier detection (:mod:`meshlib.resilience.outlier`, Envoy's
  30 s x ejections).
* one probe at a time in half-open, and one success to close: Finagle's probe semantics.

Why not ``pybreaker.CircuitBreaker.call()`` (or ``calling()``)?
    ``call()`` runs the protected function while holding the breaker's ``RLock``, so every request through
    one breaker would wait for the one before it to finish its I/O: the breaker would serialise the
    endpoint. ``calling()`` releases the lock before the body runs, but then half-open lets *every*
    concurrent caller through (not one probe), and its reset timeout reads ``datetime.now()``, which tests
    cannot control. pybreaker has no asyncio support without tornado either.

So :class:`EndpointBreaker` keeps pybreaker for what it does well, the state machine's *storage and
notifications*: a ``pybreaker.CircuitBreaker`` holds the current state (``closed``/``open``/``half-open``),
the consecutive-failure counter and the listeners, and is driven only through its public ``open()``,
``half_open()`` and ``close()`` transitions, which take its lock for a few microseconds. The adapter adds
what pybreaker cannot do: timing on the injected clock, the penalty backoff, and the single-probe gate.
Nothing is held across I/O: :meth:`~EndpointBreaker.allow` returns before the request is sent, and the
result is reported afterwards with :meth:`~EndpointBreaker.record_success` / ``record_failure``. The same
object serves threads and event loops alike (its locks are only ever held for a few operations, so taking
one from a coroutine never blocks the loop for long).

Listeners (:class:`BreakerListener`) are called *after* the breaker's locks are released, so they may log,
export metrics or even call back into the breaker. Every state change is logged as one line on the
``meshlib.resilience`` logger (WARNING when opening, INFO otherwise).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import pybreaker

__all__ = [
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "BreakerListener",
    "EndpointBreaker",
]

logger = logging.getLogger("meshlib.resilience")

STATE_CLOSED: str = pybreaker.STATE_CLOSED
STATE_OPEN: str = pybreaker.STATE_OPEN
STATE_HALF_OPEN: str = pybreaker.STATE_HALF_OPEN


class BreakerListener(Protocol):
    """Called once per state change, after the breaker's locks are released.

    ``old`` and ``new`` are :data:`STATE_CLOSED`, :data:`STATE_OPEN` or :data:`STATE_HALF_OPEN`.
    """

    def __call__(self, breaker: EndpointBreaker, old: str, new: str, /) -> None: ...


class _Collect(pybreaker.CircuitBreakerListener):
    """pybreaker listener that only queues the change; the adapter delivers it once its lock is released."""

    def __init__(self, pending: deque[tuple[str, str]]) -> None:
        self._pending = pending

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else new_state.name
        if old != new_state.name:
            self._pending.append((old, new_state.name))


class EndpointBreaker:
    """A circuit breaker for one endpoint (or one service), safe to share between threads and event loops.

    Protocol, per attempt::

        if not breaker.allow():           # before sending; False: skip this endpoint
            ...pick another endpoint...
        try:
            send()                        # no breaker lock is held here
        except BaseException as exc:
            verdict = classify_exception(exc)
            ...
        # then exactly one of:
        breaker.record_failure()          # verdict.endpoint_failure
        breaker.record_success()          # the endpoint answered and it was not its fault
        breaker.release()                 # no verdict (cancelled, or allowed but never sent)

    Results are evidence about the endpoint whichever request they come from: in closed and half-open
    state a success resets the failure count (and closes a half-open breaker), a failure counts (and
    re-opens a half-open breaker). Results arriving while open belong to requests admitted before the trip
    and are ignored. ``allow()`` on a closed breaker reads one attribute, takes no lock and calls no clock.
    """

    __slots__ = (
        "_cb",
        "_clock",
        "_jitter",
        "_listeners",
        "_lock",
        "_penalties",
        "_pending",
        "_probe_deadline",
        "_probing",
        "_retry_at",
        "_rng",
        "_state",
        "_storage",
        "fail_max",
        "max_reset_timeout",
        "name",
        "reset_timeout",
        "trips",
    )

    def __init__(
        self,
        name: str = "",
        *,
        fail_max: int = 5,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 60.0,
        jitter: float = 0.5,
        listeners: Iterable[BreakerListener] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if fail_max < 1:
            raise ValueError(f"EndpointBreaker fail_max must be >= 1, not {fail_max!r}")
        if reset_timeout <= 0.0 or max_reset_timeout < reset_timeout:
            raise ValueError(
                f"EndpointBreaker needs 0 < reset_timeout <= max_reset_timeout, "
                f"not {reset_timeout!r} and {max_reset_timeout!r}"
            )
        if jitter < 0.0:
            raise ValueError(f"EndpointBreaker jitter must be >= 0, not {jitter!r}")
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self._jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()
        self._listeners = tuple(listeners)
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, str]] = deque()
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            listeners=[_Collect(self._pending)],
            name=name or None,
        )
        # Mirror of the pybreaker state, read without a lock on the hot path. Only written under _lock.
        self._state: str = STATE_CLOSED
        self._retry_at = 0.0  # when open: the clock time from which a probe is allowed
        self._penalties = 0  # consecutive trips without a successful probe: the backoff exponent
        self._probing = False
        self._probe_deadline = 0.0
        #: How many times the breaker has opened (closed -> open and half-open -> open).
        self.trips = 0

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (pybreaker's names). An open breaker whose penalty has passed
        still reads ``open`` until :meth:`allow` lets its probe through."""
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far (pybreaker's ``fail_counter``)."""
        return self._storage.counter

    @property
    def circuit(self) -> pybreaker.CircuitBreaker:
        """The underlying ``pybreaker.CircuitBreaker`` (state storage and listeners). Never call its ``call()``."""
        return self._cb

    def available(self) -> bool:
        """Whether :meth:`allow` would say yes now, without taking a probe slot: for building a balancer's
        exclude set. A ``True`` may still turn into ``allow() == False`` if another caller takes the probe."""
        state = self._state
        if state is STATE_CLOSED:
            return True
        now = self._clock()
        if state is STATE_OPEN:
            return now >= self._retry_at
        return not self._probing or now >= self._probe_deadline

    # -- the request path ------------------------------------------------------------------------------

    def allow(self) -> bool:
        """May a request be sent to this endpoint now?

        Closed: yes. Open: no, until the penalty has passed; then the breaker turns half-open and this caller
        (only this one) gets ``True`` and carries the probe. Half-open with the probe in flight: no. A probe
        that never reports back (a bug, a lost task) is given up after one more penalty, so the endpoint is
        not shut out forever: after ``max_reset_timeout``, another caller may probe.
        """
        if self._state is STATE_CLOSED:  # lock-free fast path: one attribute read
            return True
        now = self._clock()
        if self._state is STATE_OPEN and now < self._retry_at:  # lock-free fast reject
            return False
        with self._lock:
            state = self._state
            if state is STATE_CLOSED:
                return True
            if state is STATE_OPEN:
                if now < self._retry_at:
                    return False
                self._cb.half_open()
                self._state = STATE_HALF_OPEN
            elif self._probing and now < self._probe_deadline:
                return False
            self._probing = True
            self._probe_deadline = now + self.max_reset_timeout
        self._notify()
        return True

    def record_success(self) -> None:
        """The endpoint answered and the answer does not count against it (a 2xx, a 404...)."""
        if self._state is STATE_CLOSED and self._storage.counter == 0:
            return  # nothing to reset: the common case takes no lock
        with self._lock:
            state = self._state
            if state is STATE_OPEN:
                return
            self._storage.reset_counter()
            if state is STATE_HALF_OPEN:
                self._probing = False
                self._penalties = 0
                self._cb.close()
                self._state = STATE_CLOSED
        self._notify()

    def record_failure(self) -> None:
        """The attempt failed in a way that counts against the endpoint (``Classification.endpoint_failure``)."""
        with self._lock:
            state = self._state
            if state is STATE_OPEN:
                return
            self._storage.increment_counter()
            if state is STATE_HALF_OPEN or self._storage.counter >= self.fail_max:
                self._trip()
        self._notify()

    def release(self) -> None:
        """An :meth:`allow`\\ ed attempt ends without a verdict (cancelled, or never sent after all).

        Frees the half-open probe slot so the next caller can probe; changes nothing else. Called for an
        attempt that was admitted while closed, it may let a second probe through: rare and harmless.
        """
        if self._state is STATE_HALF_OPEN:
            with self._lock:
                self._probing = False

    # -- internals -------------------------------------------------------------------------------------

    def _penalty_for(self, penalties: int) -> float:
        base = min(self.max_reset_timeout, self.reset_timeout * (2.0 ** min(penalties, 64)))
        if self._jitter:
            base += base * self._jitter * self._rng.random()
        return base

    def _trip(self) -> None:
        """Open the breaker (lock held)."""
        penalty = self._penalty_for(self._penalties)
        self._penalties += 1
        self._retry_at = self._clock() + penalty
        self._probing = False
        self.trips += 1
        self._cb.reset_timeout = penalty
        self._cb.open()
        self._state = STATE_OPEN

    def _notify(self) -> None:
        """Deliver queued state changes to the log and listeners, outside every lock."""
        pending = self._pending
        while pending:
            try:
                old, new = pending.popleft()
            except IndexError:  # another thread delivered it first
                return
            if new == STATE_OPEN:
                why = "probe failed" if old == STATE_HALF_OPEN else f"{self.fail_max} consecutive failures"
                logger.warning(
                    "circuit breaker %s: %s -> %s (%s); next probe in %.1f s",
                    self.name or "?",
                    old,
                    new,
                    why,
                    self._cb.reset_timeout,
                )
            else:
                logger.info("circuit breaker %s: %s -> %s", self.name or "?", old, new)
            for listener in self._listeners:
                try:
                    listener(self, old, new)
                except Exception:
                    logger.exception("circuit breaker %s: listener %r failed", self.name or "?", listener)

    def __repr__(self) -> str:
        return f"EndpointBreaker({self.name!r}, state={self._state}, failures={self._storage.counter})"
