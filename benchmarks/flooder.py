"""The flooding caller of Z2: ``python -m benchmarks.flooder --port P --caller ID --connections C --duration S``.

Opens ``C`` keep-alive connections, prints ``ready``, waits for a line on stdin, then on every connection writes
``--pipeline`` requests ``GET /`` with ``x-caller: ID`` at once (HTTP/1.1 pipelining) and reads their answers,
again and again for ``S`` seconds (closed loop: as fast as the server answers). ``--nice`` lowers its CPU
priority, so that on a small machine it takes the CPU the measuring process leaves, not the reverse.
Raw asyncio streams and a minimal HTTP/1.1 reader, not an HTTP client library,
so the flooder spends as little CPU per request as possible and the server is what limits its rate. Prints one
JSON line: requests answered, by status, and the seconds it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter


def _answer(buffer: bytes) -> tuple[int, int] | None:
    """(status, bytes used) of the first whole answer in ``buffer``, or ``None`` if it is not all there yet.

    The server's answers all carry ``content-length`` (its app and meshlib's refusals both set it)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError(f"answer without content-length: {bytes(head[:200])!r}")
    stop = head.find(b"\r\n", at + 17)
    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
    used = end + 4 + length
    return (int(buffer[9:12]), used) if len(buffer) >= used else None


async def flood(port: int, caller: str, connections: int, duration: float, pipeline: int = 1) -> dict[str, object]:
    """Connect, say ``ready``, wait for the go line, flood for ``duration`` seconds; the counts."""
    request = f"GET / HTTP/1.1\r\nhost: limited\r\nx-caller: {caller}\r\n\r\n".encode()
    batch = request * pipeline
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    stop = asyncio.Event()
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while not stop.is_set():
                writer.write(batch)
                left = pipeline
                while left:  # parse every whole answer in the buffer, then read more: one await per read
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionResetError("the server closed the connection")
                    buffer += data
                    while left and (parsed := _answer(buffer)) is not None:
                        status, used = parsed
                        statuses[status] += 1
                        buffer = buffer[used:]
                        left -= 1
        except (OSError, ValueError) as error:
            errors.append(f"{type(error).__name__}: {error}")
        finally:
            writer.close()

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(one(r, w)) for r, w in streams]
    await asyncio.sleep(duration)
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())}, "elapsed": elapsed, "errors": errors[:5]}


def main(argv: list[str] | None = None) -> None:
    """Flood once and print the counts as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flooder", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--caller", required=True, help="the SPIFFE ID sent in x-caller")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--pipeline", type=int, default=1, help="requests written at once per connection")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    result = asyncio.run(flood(args.port, args.caller, args.connections, args.duration, args.pipeline))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
