"""Worker: one core's float32 peak, measured with a numpy matmul (run with OPENBLAS_NUM_THREADS=1).

Prints ``{"gflops_best": ..., "gflops_median": ..., "openblas": {...}}``. The peak
is the best of many short products timed on this thread's CPU clock, so time
slices lost to other processes on a shared machine do not count against it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np


def measure(n: int = 512, repeats: int = 300) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    for _ in range(5):
        np.matmul(a, b, out=c)
    rates = []
    for _ in range(repeats):
        t = time.thread_time()
        np.matmul(a, b, out=c)
        dt = time.thread_time() - t
        if dt > 0:
            rates.append(2 * n**3 / dt / 1e9)
    info: dict[str, Any] = {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-untyped]

        pools = [p for p in threadpool_info() if p.get("internal_api") == "openblas"]
        if pools:
            info.update(
                architecture=pools[0].get("architecture"),
                threads=pools[0].get("num_threads"),
                version=pools[0].get("version"),
            )
    except ImportError:
        pass
    return {"gflops_best": max(rates), "gflops_median": statistics.median(rates), "openblas": info}


if __name__ == "__main__":
    print(json.dumps(measure()))
    sys.exit(0)
