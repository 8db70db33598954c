"""S12 with capacity from parallelism (``s12slots``): 1x/2x/4x backends of 4/8/16 slots, every request 200 ms.

``python -m benchmarks s12slots``. The same variants, load and targets as :mod:`benchmarks.s12_capacity` (whose
docstring describes them); only the way capacity differs changes: in ``s12`` a faster backend answers each
request sooner (so the 1x backend's 200 ms bounds any p99 that sends it more than 1 % of the traffic), here
every backend answers in 200 ms and a larger one serves more at once.
"""

from __future__ import annotations

from benchmarks.s12_capacity import plot
from benchmarks.s12_capacity import run_slots as run

__all__ = ["plot", "run"]
