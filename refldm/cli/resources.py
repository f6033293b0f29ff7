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


def matmul_throughput() -> float:
    """Operations per second of a float32 matrix product on this machine, measured in a few milliseconds."""
    import numpy as np
    a = np.ones((384, 384), np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    return 4 * 2 * 384 ** 3 / max(time.perf_counter() - start, 1e-9)
