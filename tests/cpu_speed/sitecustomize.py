"""Simulate a CPU ``NANO_TFX_TEST_CPU_SPEED`` times faster (or slower, < 1) than this one.

Test tool only (``tests/cpu_speed_sim.py`` explains it): every Python-level duration the process
reads through ``time.perf_counter`` / ``time.monotonic`` is divided by the factor, and
``time.sleep`` sleeps the factor times longer, so to the code under test the work looks that much
faster while sleeps and timeouts keep their meaning. Wall-clock ``time.time`` stays real (other
processes, file times and Dask heartbeats compare it across processes).
Loaded at interpreter start (this directory on ``PYTHONPATH``) so that ``from time import
perf_counter`` in any module picks the scaled clock, subprocesses included.
"""
import os

_factor = os.environ.get("NANO_TFX_TEST_CPU_SPEED")
if _factor:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cpu_speed_sim

    cpu_speed_sim.install(float(_factor))
