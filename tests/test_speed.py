"""Side-by-side timer (``nano_tfx.speed``): interleaved, budgeted, ratios that hold under noise."""
from __future__ import annotations

import time

import numpy as np
import pytest

from nano_tfx.speed import side_by_side


def _busy(ms_per_row: float):
    """A call costing ``ms_per_row`` per input row, spent on the CPU (like an engine)."""
    def run(inputs):
        end = time.perf_counter() + ms_per_row * len(inputs[0]) / 1000.0
        while time.perf_counter() < end:
            pass
        return [inputs[0]]
    return run


def test_ratios_batches_and_budget():
    x = [np.zeros((8, 3), np.float32)]
    start = time.perf_counter()
    res = side_by_side({"slow": _busy(0.6), "fast": _busy(0.2)}, x, batch=4, budget_s=1.0)
    took = time.perf_counter() - start
    assert res.fastest() == "fast"
    assert res.speedup("slow", "fast") == pytest.approx(3.0, rel=0.25)
    assert res.b1_ms["fast"] == pytest.approx(0.2, rel=0.5)
    assert res.batch == 4 and res.batch_ms["slow"] == pytest.approx(2.4, rel=0.3)
    assert res.rounds >= 3 and min(res.calls.values()) >= 3
    assert took < 3.0  # the budget (plus warm-up and settle pauses) bounds the wall time
    assert set(res.to_dict()["b1_ms"]) == {"slow", "fast"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(runs={}), "runs: expected at least one"),
    (dict(budget_s=0), "budget_s: expected seconds > 0"),
    (dict(budget_s=True), "budget_s: expected seconds > 0"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(runs={"a": _busy(0.01)}, inputs=[np.zeros((1, 1))])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        side_by_side(**args)
