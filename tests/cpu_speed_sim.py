"""A CPU 10x faster or slower than this one, simulated by scaling the process's clock.

Every test must hold on a CPU 10x faster or slower than the developer's. The library's timing
decisions (the timeout rule, the side-by-side timer's budget, sequential looks) read durations
through ``time.perf_counter`` / ``time.monotonic``; dividing every duration by a factor S makes
the same work look S times faster to them, and multiplying ``time.sleep`` by S keeps sleeps,
budgets and timeouts in real seconds of that faster world. Ratios of two timings (speedups) are
unchanged by a uniform scale, as they would be on a uniformly faster CPU; what differs on a real
CPU of another kind (ISA-dependent ratios) is not simulated.

Use: ``NANO_TFX_TEST_CPU_SPEED=10 .venv/bin/python -m pytest tests/...`` (``0.1``: 10x slower).
``tests/conftest.py`` installs it in-process and puts ``tests/cpu_speed`` (a ``sitecustomize``)
on ``PYTHONPATH`` so subprocesses (CLI, pipelines, Beam workers) see the same clock.
"""
from __future__ import annotations

import os
import time

#: the directory whose ``sitecustomize`` installs the scaled clock in a subprocess
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_speed")

_installed: float | None = None


def install(factor: float) -> None:
    """Scale this process's monotonic clocks by 1/``factor`` and its sleeps by ``factor``."""
    global _installed
    if not factor > 0:
        raise ValueError(f"NANO_TFX_TEST_CPU_SPEED: expected a factor > 0, got {factor!r}")
    if _installed is not None:
        return
    _installed = factor
    real_perf, real_perf_ns = time.perf_counter, time.perf_counter_ns
    real_mono, real_mono_ns = time.monotonic, time.monotonic_ns
    real_sleep = time.sleep
    anchor_perf, anchor_mono = real_perf(), real_mono()
    anchor_perf_ns, anchor_mono_ns = real_perf_ns(), real_mono_ns()

    time.perf_counter = lambda: anchor_perf + (real_perf() - anchor_perf) / factor
    time.perf_counter_ns = lambda: anchor_perf_ns + int((real_perf_ns() - anchor_perf_ns) / factor)
    time.monotonic = lambda: anchor_mono + (real_mono() - anchor_mono) / factor
    time.monotonic_ns = lambda: anchor_mono_ns + int((real_mono_ns() - anchor_mono_ns) / factor)
    time.sleep = lambda s: real_sleep(s * factor)


def factor() -> float | None:
    """The simulated speed factor of this process (None: the real CPU)."""
    return _installed


def subprocess_env(factor: float, base: dict | None = None) -> dict:
    """``base`` (default ``os.environ``) with the factor set and ``SITE_DIR`` first on
    ``PYTHONPATH``: a Python subprocess started with it runs on the scaled clock too."""
    env = dict(os.environ if base is None else base)
    env["NANO_TFX_TEST_CPU_SPEED"] = str(factor)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE_DIR, env.get("PYTHONPATH")]))
    return env
