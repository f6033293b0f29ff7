"""What this machine has, for the commands' estimates before a big run: free memory and matmul speed."""

from __future__ import annotations

import time


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def matmul_throughput(seconds: float = 0.05) -> float:
    """Operations per second of a float32 matrix product (512 x 512) on this machine: the median rate of five
    timed batches after a warm-up, about `seconds` in all. A single few-millisecond timing varied 70-fold on a
    shared machine (docs/performance.md, "The time estimate"); the median of batches holds within about 2x."""
    import numpy as np
    n = 512
    a = np.ones((n, n), np.float32)
    a @ a
    start = time.perf_counter()
    a @ a
    one = max(time.perf_counter() - start, 1e-6)
    reps = max(1, min(200, int(seconds / 5 / one)))
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            a @ a
        rates.append(reps * 2 * n ** 3 / max(time.perf_counter() - start, 1e-9))
    return sorted(rates)[2]
