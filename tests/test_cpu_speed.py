"""The suite's promise "holds on a CPU 10x faster or slower" checked where time decides.

``tests/cpu_speed_sim.py`` simulates such a CPU by scaling the process's clock. The tests whose
*library decisions* read the clock (the timeout rule, the side-by-side timer's budget and ratios,
the speed gate) run again here under a 10x faster and a 10x slower clock, in a subprocess, so a
change that makes any of them depend on this machine's speed turns CI red on every machine.
The whole suite passed under both factors when this was written (``NANO_TFX_TEST_CPU_SPEED``,
see the README); these are the ones that can change their mind with the clock.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: tests whose assertions depend on what the library decides from measured time
TIME_DECIDED = [
    "tests/test_speed.py",
    "tests/test_quantize_inc.py::test_timeout_is_honoured",
    "tests/test_hardening.py::test_auto_keeps_its_timeout",
]


def _python(code: str, factor: float) -> str:
    from cpu_speed_sim import subprocess_env

    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(factor), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_the_simulated_clock_scales_durations_and_sleeps(factor):
    # 0.2 s of real busy work looks like 0.2 / factor s; a 0.05 s sleep still looks like 0.05 s
    out = _python(
        "import time\n"
        "t = time.perf_counter(); m = time.monotonic(); w = time.time()\n"
        "while time.time() - w < 0.2: pass\n"
        "busy = time.perf_counter() - t; mono = time.monotonic() - m\n"
        "t = time.perf_counter(); time.sleep(0.05); slept = time.perf_counter() - t\n"
        "print(busy, mono, slept)\n", factor)
    busy, mono, slept = map(float, out.split())
    # loose bounds (a descheduled process only runs late); the two factors are 100x apart
    assert busy == pytest.approx(0.2 / factor, rel=0.5) and mono == pytest.approx(0.2 / factor, rel=0.5)
    assert 0.05 <= slept < 0.05 * 5


@pytest.mark.parametrize("factor", [10.0, 0.1], ids=["10x-faster", "10x-slower"])
def test_time_decided_tests_hold_on_a_cpu_10x_faster_or_slower(factor):
    env = dict(os.environ, NANO_TFX_TEST_CPU_SPEED=str(factor))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIME_DECIDED],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail + proc.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail.splitlines()[-1], tail
