"""meshlib benchmarks: scenarios S1-S7 of issue 6, run by ``python -m benchmarks`` (``./dev.sh bench``).

Every scenario measures meshlib and its comparison (raw httpx, an HAProxy sidecar, another balancer) in the
same run, interleaved, and reports medians of repeats, ratios and PASS/MISS against its target. Results go
to ``docs/performance/`` as JSON and PNG; ``docs/performance.md`` explains the method and the numbers.

Modules: :mod:`benchmarks.harness` (histogram, CPU meters, pinning, repeats, result tables),
:mod:`benchmarks.load` (closed- and open-loop generators), :mod:`benchmarks.servers` (nginx, HAProxy,
backend and tier subprocesses), :mod:`benchmarks.report` (JSON, plots, machine description), and one module
per scenario (``s1_overhead`` ... ``s7_async_throughput``).
"""
