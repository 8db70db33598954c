"""Load generators: closed loop (N workers back to back) and open loop (constant rate), sync and async.

Closed loop measures throughput and CPU per request: ``concurrency`` workers each send the next request as
soon as the previous one returns. Open loop measures latency honestly: requests are *scheduled* at a
constant rate, and each latency is measured from its intended start time, not from when a worker got to
send it. A stall therefore shows up in the latency of every request scheduled during it, instead of
silently lowering the rate ("coordinated omission", the wrk2 / Kinvolk lesson). Sync generators use
threads; async ones use one task per request on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence

from benchmarks.harness import CpuMeter, Histogram

perf = time.perf_counter


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What one request ended as: success, attempts meshlib made, which endpoint answered (or a tag)."""

    ok: bool
    attempts: int = 1
    endpoint: str = ""


OK = Outcome(True)


@dataclasses.dataclass
class ClosedResult:
    """A closed-loop run: completed requests, errors, wall time, latencies, CPU readings."""

    count: int
    errors: int
    elapsed: float
    hist: Histogram
    cpu: CpuMeter

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.count / self.elapsed if self.elapsed > 0 else 0.0

    def cpu_us_per_request(self, server: str | None = None) -> float:
        """Client CPU per request in µs, or the named server's."""
        used = self.cpu.client if server is None else self.cpu.servers.get(server, float("nan"))
        return used / self.count * 1e6 if self.count else float("nan")


@dataclasses.dataclass
class OpenResult:
    """An open-loop run, one entry per request in schedule order (times relative to the run's start)."""

    intended: array[float]
    latency: array[float]
    ok: bytearray
    attempts: array[int]
    endpoints: list[str]
    elapsed: float
    cpu: CpuMeter

    def select(self, start: float = 0.0, end: float = float("inf")) -> list[int]:
        """Indices of requests scheduled within ``[start, end)`` seconds."""
        return [i for i, t in enumerate(self.intended) if start <= t < end]

    def hist(self, indices: Sequence[int] | None = None, *, ok_only: bool = False) -> Histogram:
        """Latency histogram of the selected requests (all by default)."""
        idx = range(len(self.latency)) if indices is None else indices
        return Histogram(self.latency[i] for i in idx if not ok_only or self.ok[i])

    def success(self, indices: Sequence[int] | None = None, within: float | None = None) -> float:
        """Share of the selected requests that succeeded (and, with ``within``, did so in time)."""
        idx = range(len(self.latency)) if indices is None else indices
        n = 0
        good = 0
        for i in idx:
            n += 1
            if self.ok[i] and (within is None or self.latency[i] <= within):
                good += 1
        return good / n if n else float("nan")

    def mean_attempts(self, indices: Sequence[int] | None = None) -> float:
        """Average attempts per request over the selection."""
        idx = list(range(len(self.latency)) if indices is None else indices)
        return sum(self.attempts[i] for i in idx) / len(idx) if idx else float("nan")


# --------------------------------------------------------------------------------------------- closed loop


def closed_sync(
    send: Callable[[], object],
    *,
    concurrency: int,
    duration: float,
    warmup: int = 50,
    pids: dict[str, int] | None = None,
) -> ClosedResult:
    """``concurrency`` threads call ``send()`` back to back for ``duration`` seconds (after ``warmup`` each)."""
    barrier = threading.Barrier(concurrency + 1)
    stop = threading.Event()
    hists = [Histogram() for _ in range(concurrency)]
    errors = [0] * concurrency

    def worker(k: int) -> None:
        for _ in range(warmup):
            with contextlib.suppress(Exception):
                send()
        barrier.wait()
        hist = hists[k]
        while not stop.is_set():
            t0 = perf()
            try:
                send()
            except Exception:
                errors[k] += 1
                continue
            hist.record(perf() - t0)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    meter = CpuMeter(pids)
    barrier.wait()
    meter.start()
    t0 = perf()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    elapsed = perf() - t0
    meter.stop()
    total = Histogram()
    for h in hists:
        total.merge(h)
    return ClosedResult(len(total) + sum(errors), sum(errors), elapsed, total, meter)


async def closed_async(
    send: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    duration: float,
    warmup: int = 50,
    pids: dict[str, int] | None = None,
) -> ClosedResult:
    """``concurrency`` tasks await ``send()`` back to back for ``duration`` seconds (after a warmup)."""
    await asyncio.gather(*(_swallow(send) for _ in range(warmup)))
    hist = Histogram()
    errors = 0
    stop = False

    async def worker() -> None:
        nonlocal errors
        while not stop:
            t0 = perf()
            try:
                await send()
            except Exception:
                errors += 1
                # A send that fails before its first real suspension (a breaker open, a fail-fast limit) would
                # otherwise spin here forever: the sleep below never gets the loop back and ``stop`` never flips.
                await asyncio.sleep(0)
                continue
            hist.record(perf() - t0)

    meter = CpuMeter(pids)
    meter.start()
    t0 = perf()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(duration)
    stop = True
    await asyncio.gather(*tasks)
    elapsed = perf() - t0
    meter.stop()
    return ClosedResult(len(hist) + errors, errors, elapsed, hist, meter)


async def _swallow(send: Callable[[], Awaitable[object]]) -> None:
    with contextlib.suppress(Exception):
        await send()


# --------------------------------------------------------------------------------------------- open loop


def _new_open(n: int) -> tuple[array[float], array[float], bytearray, array[int], list[str]]:
    return array("d", [0.0]) * n, array("d", [0.0]) * n, bytearray(n), array("i", [0]) * n, [""] * n


def open_sync(
    send: Callable[[], Outcome],
    on_error: Callable[[BaseException], Outcome],
    *,
    rate: float,
    duration: float,
    workers: int = 32,
    pids: dict[str, int] | None = None,
) -> OpenResult:
    """Schedule ``rate`` requests/s for ``duration`` s; a pool of ``workers`` threads sends them.

    A dispatcher thread releases each request at its intended time; if every worker is busy, the request
    waits in the queue and that wait counts in its latency.
    """
    n = int(rate * duration)
    intended, latency, ok, attempts, endpoints = _new_open(n)
    jobs: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            i, t_int = job
            try:
                out = send()
            except Exception as exc:
                out = on_error(exc)
            latency[i] = perf() - t_int
            ok[i] = out.ok
            attempts[i] = out.attempts
            endpoints[i] = out.endpoint

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in pool:
        t.start()
    meter = CpuMeter(pids)
    meter.start()
    start = perf()
    for i in range(n):
        t_int = start + i / rate
        delay = t_int - perf()
        if delay > 0:
            time.sleep(delay)
        intended[i] = t_int - start
        jobs.put((i, t_int))
    for _ in pool:
        jobs.put(None)
    for t in pool:
        t.join()
    elapsed = perf() - start
    meter.stop()
    return OpenResult(intended, latency, ok, attempts, endpoints, elapsed, meter)


async def open_async(
    send: Callable[[], Awaitable[Outcome]],
    on_error: Callable[[BaseException], Outcome],
    *,
    rate: float,
    duration: float,
    pids: dict[str, int] | None = None,
    at: Callable[[float], None] | None = None,
) -> OpenResult:
    """Schedule ``rate`` requests/s for ``duration`` s on the running loop, one task per request.

    ``at(t)`` (optional) is called with the schedule time of every request before it starts: scenarios use
    it to change backend behaviour at a given second without a separate timer.
    """
    n = int(rate * duration)
    intended, latency, ok, attempts, endpoints = _new_open(n)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, t_int: float) -> None:
        try:
            out = await send()
        except Exception as exc:
            out = on_error(exc)
        latency[i] = perf() - t_int
        ok[i] = out.ok
        attempts[i] = out.attempts
        endpoints[i] = out.endpoint

    meter = CpuMeter(pids)
    meter.start()
    start = perf()
    for i in range(n):
        t_int = start + i / rate
        delay = t_int - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        intended[i] = t_int - start
        if at is not None:
            at(t_int - start)
        task = asyncio.ensure_future(one(i, t_int))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*list(tasks))
    elapsed = perf() - start
    meter.stop()
    return OpenResult(intended, latency, ok, attempts, endpoints, elapsed, meter)
