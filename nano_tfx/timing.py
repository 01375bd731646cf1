"""Latency measurement shared by trials, the callback and the benchmarks."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np


def latency_ms(run: Callable[[Sequence[np.ndarray]], object], inputs: Sequence[np.ndarray],
               warmup: int = 3, repeats: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of ``run(inputs)`` in ms; stops early once ``budget_s`` is spent."""
    for _ in range(warmup):
        run(inputs)
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return float(np.median(times) * 1000.0)


def rows(inputs: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The first ``n`` rows of a batch, repeated if the batch is smaller."""
    out = []
    for a in inputs:
        reps = -(-n // len(a))
        out.append(np.concatenate([a] * reps)[:n] if reps > 1 else a[:n])
    return out
