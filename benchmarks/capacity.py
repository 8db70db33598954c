"""Capacity-limited backends: ``python -m benchmarks.capacity --count N --slots K --service-time S``.

Each backend is a minimal HTTP/1.1 keep-alive server (asyncio, one process for all of them, its own core
when pinned) that works on at most ``K`` requests at once, each for ``S`` seconds, and queues the rest in
arrival order: a worker pool in front of a FIFO queue, the shape of most real servers (a thread pool, a
gunicorn worker set, a database connection pool). Its capacity is ``K / S`` requests per second; offered more,
the queue (and so the latency) grows without bound. A queued request is served even when its caller has
already given up (as in a thread pool, which only finds out when it writes): under overload the server keeps
spending its capacity on answers nobody waits for. Answers are ``200`` with a 2-byte body.

Driven like :mod:`benchmarks.backend`: the first stdout line is ``{"ports": [...], "pid": ...}``; then one
JSON command per stdin line, one JSON reply per command: ``{"op": "stats"}`` -> ``{"served": [...],
"queued_max": [...], "pending": [...]}`` (per backend: served and longest queue since start or the last
``reset``, requests queued or in service now), ``{"op": "reset"}``, ``{"op": "quit"}``.

Heterogeneous capacity (S12): ``--speeds 1,2,4`` makes one backend per entry, backend *i* serving each request
in ``S / speed_i`` (so its capacity is ``speed_i * K / S``). ``--orca`` adds an ORCA load report to every answer
(gRFC A51's HTTP form, ``endpoint-load-metrics: TEXT cpu_utilization=U, rps_fractional=Q``): ``Q`` is the requests
the backend finished in the last second and ``U = Q * service_time / K`` the share of its slots that work kept
busy, so ``Q / U`` (A58's weight) is the backend's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from benchmarks.servers import _Driven

_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"


class _Server:
    """One backend: ``slots`` requests in service at once, the rest waiting in arrival order."""

    def __init__(self, slots: int, service_time: float, orca: bool = False) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.slot_count = slots
        self.service_time = service_time
        self.orca = orca
        self.finished: deque[float] = deque()  # completion times within the last second (ORCA's rps)
        self.served = 0
        self.waiting = 0
        self.busy = 0
        self.queued_max = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                self.waiting += 1
                self.queued_max = max(self.queued_max, self.waiting)
                async with self.slots:
                    self.waiting -= 1
                    self.busy += 1
                    await asyncio.sleep(self.service_time)
                    self.busy -= 1
                    self.served += 1
                writer.write(self.answer() if self.orca else _ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def answer(self) -> bytes:
        """The answer with its ORCA load report over the last second."""
        now = time.monotonic()
        finished = self.finished
        finished.append(now)
        while finished[0] < now - 1.0:
            finished.popleft()
        qps = float(len(finished))
        utilization = min(1.0, qps * self.service_time / self.slot_count)
        report = f"endpoint-load-metrics: TEXT cpu_utilization={utilization:.4f}, rps_fractional={qps:.1f}\r\n"
        return _HEAD + report.encode() + b"\r\nok"


async def _main(count: int, slots: int, service_time: float, speeds: list[float] | None, orca: bool) -> None:
    if speeds:
        servers = [_Server(slots, service_time / speed, orca) for speed in speeds]
    else:
        servers = [_Server(slots, service_time, orca) for _ in range(count)]
    listening = [await asyncio.start_server(s.handle, "127.0.0.1", 0, backlog=4096) for s in servers]
    ports = [sock.sockets[0].getsockname()[1] for sock in listening]
    print(json.dumps({"ports": ports, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def commands() -> None:  # stdin in a thread; replies computed on the loop
        for line in sys.stdin:
            if not line.strip():
                continue
            op = json.loads(line)["op"]
            reply = asyncio.run_coroutine_threadsafe(_reply(servers, op), loop).result()
            print(json.dumps(reply), flush=True)
            if op == "quit":
                break
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=commands, daemon=True).start()
    await done


async def _reply(servers: list[_Server], op: str) -> Any:
    if op == "stats":
        return {
            "served": [s.served for s in servers],
            "queued_max": [s.queued_max for s in servers],
            "pending": [s.waiting + s.busy for s in servers],
        }
    if op == "reset":
        for s in servers:
            s.served = 0
            s.queued_max = s.waiting
        return {}
    return {}


def main(argv: list[str] | None = None) -> None:
    """Serve until ``quit`` or EOF."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--service-time", type=float, required=True)
    parser.add_argument("--speeds", default="", help="one backend per comma-separated speed (1,2,4)")
    parser.add_argument("--orca", action="store_true", help="answer with an ORCA endpoint-load-metrics header")
    args = parser.parse_args(argv)
    speeds = [float(x) for x in args.speeds.split(",") if x.strip()]
    asyncio.run(_main(args.count, args.slots, args.service_time, speeds or None, args.orca))


class CapacityProcess(_Driven):
    """``count`` capacity-limited backends in a child process."""

    module = "benchmarks.capacity"

    def __init__(
        self,
        count: int,
        slots: int,
        service_time: float,
        prefix: Sequence[str] = (),
        *,
        speeds: Sequence[float] = (),
        orca: bool = False,
    ) -> None:
        self.speeds = tuple(speeds)
        self.count = len(self.speeds) if self.speeds else count
        self.slots = slots
        self.service_time = service_time
        self.orca = orca
        self.prefix = tuple(prefix)
        self.ports = []

    @property
    def capacity(self) -> float:
        """Requests per second all the backends together can serve."""
        return sum(self.capacities)

    @property
    def capacities(self) -> list[float]:
        """Requests per second each backend can serve."""
        speeds = self.speeds or (1.0,) * self.count
        return [speed * self.slots / self.service_time for speed in speeds]

    def _args(self) -> list[str]:
        args = ["--count", str(self.count), "--slots", str(self.slots), "--service-time", str(self.service_time)]
        if self.speeds:
            args += ["--speeds", ",".join(f"{s:g}" for s in self.speeds)]
        if self.orca:
            args.append("--orca")
        return args

    def stats(self) -> dict[str, list[int]]:
        """Per backend: requests served and the longest queue since start or :meth:`reset`, and pending now."""
        return dict(self.command({"op": "stats"}))

    def reset(self) -> None:
        """Zero the counters."""
        self.command({"op": "reset"})


if __name__ == "__main__":
    main()
