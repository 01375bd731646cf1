"""Side-by-side speed: the FP32 reference and the candidates timed in one process, one timer.

A trial times itself right after it was built, minutes apart from the others and under whatever
load the machine had then; on a shared 2-core machine that can swing latencies by 2×. What
decides "faster than FP32" and "the fastest finalist" is therefore measured here, all variants
together:

* the same call path the returned model uses (``QuantizedModel.run``, raw numpy in and out) and
  the same engine objects (so the same thread settings);
* interleaved rounds (every variant once per round, the order rotating) so a noisy neighbour
  hits all variants alike; the value per variant is the median of all its calls;
* a short sleep before each variant's slot: ONNX Runtime, OpenVINO and TensorFlow leave worker
  threads spinning after a call, which would otherwise steal the next variant's cores;
* unmeasured calls per slot after the sleep (wake-up and re-warming caches another engine's
  weights evicted: ``wake_calls``), a warm-up per variant first;
* a wall-clock budget in seconds, split between batch 1 and the evaluation batch.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nano_tfx.timing import rows

log = logging.getLogger("nano_tfx")

Run = Callable[[Sequence[np.ndarray]], object]
#: how a deployed model is called: a finalist (``QuantizedModel``) -> the call to time
#: (``nano_tfx.quantize(call_path=)``); it may also have ``time_side_by_side(models, budget_s)``
#: returning {name: batch-1 ms} to time the finalists itself (e.g. in a server-like process)
CallPath = Callable[[Any], Run]

DEFAULT_BUDGET_S = 3.0
MIN_ROUNDS = 3
MAX_ROUNDS = 40
ENOUGH_CALLS = 300  # per variant: a fast model stops early, well inside the budget
MAX_CALLS_PER_SLOT = 100
SETTLE_S = 0.02
WAKE_CALLS = 3  # at most, per slot (see ``wake_calls``)


@dataclass
class SideBySide:
    """Median latencies (ms) per variant at batch 1 and at ``batch``."""

    b1_ms: dict[str, float]
    batch: int | None = None
    batch_ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # measured batch-1 calls per variant
    rounds: int = 0
    seconds: float = 0.0

    def speedup(self, reference: str, variant: str) -> float | None:
        """``reference`` time ÷ ``variant`` time at batch 1 (> 1: ``variant`` is faster)."""
        ref, var = self.b1_ms.get(reference), self.b1_ms.get(variant)
        return None if not ref or not var else ref / var

    def fastest(self, names: Sequence[str] | None = None) -> str:
        pool = {k: v for k, v in self.b1_ms.items() if names is None or k in names}
        return min(pool, key=pool.get)

    def to_dict(self) -> dict:
        # full precision: every stored ratio must be recomputable from the stored times
        return {"b1_ms": dict(self.b1_ms), "batch": self.batch, "batch_ms": dict(self.batch_ms),
                "calls": dict(self.calls), "rounds": self.rounds, "seconds": self.seconds}


def wake_calls(measured: int) -> int:
    """Unmeasured calls before a slot's ``measured`` ones. The first calls after another engine ran
    are slow (its weights evicted this one's from the caches; measured on a 4-block encoder: TF's
    first calls after OpenVINO's took 6.8, 5.8, 5.6 ms, then 5.5 steady), and a deployed model
    called back to back runs warm. Up to 3, never more than a third of the slot: a slot of one slow
    call (BERT-base) keeps its single wake-up."""
    return max(1, min(WAKE_CALLS, measured // 3))


def _rounds(runs: Mapping[str, Run], x: list[np.ndarray], budget_s: float, settle_s: float) -> tuple[dict, int, dict]:
    names = list(runs)
    per_call: dict[str, float] = {}
    for name in names:  # warm-up; also estimates one call's cost to size the slots
        runs[name](x)
        t = time.perf_counter()
        runs[name](x)
        per_call[name] = max(time.perf_counter() - t, 1e-6)
    slot_s = budget_s / (max(MIN_ROUNDS * 2, 8) * len(names))  # aim at ~8 rounds in the budget
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    done = 0
    while done < MAX_ROUNDS and (done < MIN_ROUNDS or (
            time.perf_counter() - start < budget_s and min(map(len, samples.values())) < ENOUGH_CALLS)):
        order = names[done % len(names):] + names[:done % len(names)]
        for name in order:
            run = runs[name]
            time.sleep(settle_s)  # let the previous engine's spinning threads give the cores back
            n = max(1, min(MAX_CALLS_PER_SLOT, int(slot_s / per_call[name])))
            for _ in range(wake_calls(n)):  # wake this engine's threads, re-warm its caches; not measured
                run(x)
            for _ in range(n):
                t = time.perf_counter()
                run(x)
                samples[name].append(time.perf_counter() - t)
        done += 1
    return {n: float(np.median(v) * 1000.0) for n, v in samples.items()}, done, {n: len(v) for n, v in samples.items()}


def side_by_side(runs: Mapping[str, Run], inputs: Sequence[np.ndarray], batch: int | None = None,
                 budget_s: float = DEFAULT_BUDGET_S, settle_s: float = SETTLE_S) -> SideBySide:
    """Time every ``runs[name](inputs)`` side by side (see the module doc).

    Args:
      runs: variant name -> the call to time (e.g. ``QuantizedModel(candidate, source).run``).
      inputs: one batch of model inputs; rows are taken (repeated if short) for each batch size.
      batch: also time at this batch size (the evaluation batch); None or 1: batch 1 only.
      budget_s: wall-clock seconds for the whole comparison (at least ``MIN_ROUNDS`` rounds run).
      settle_s: pause before each variant's slot.
    """
    if not runs:
        raise ValueError("runs: expected at least one variant to time, got none")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"budget_s: expected seconds > 0, got {budget_s!r}")
    started = time.perf_counter()
    with_batch = batch is not None and batch > 1
    share = 0.6 if with_batch else 1.0
    b1, done, calls = _rounds(runs, rows(inputs, 1), budget_s * share, settle_s)
    result = SideBySide(b1_ms=b1, rounds=done, calls=calls)
    if with_batch:
        result.batch = batch
        result.batch_ms, _, _ = _rounds(runs, rows(inputs, batch), budget_s * (1 - share), settle_s)
    result.seconds = time.perf_counter() - started
    log.info("nano-tfx: side-by-side batch-1 ms %s (%d rounds, %.1fs)",
             {k: round(v, 3) for k, v in b1.items()}, done, result.seconds)
    return result



def check_min_speedup(value: Any) -> float | None:
    """``min_speedup`` as a float (None stays None: no gate); errors name the argument."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"min_speedup: expected a finite number >= 0 (FP32 time / quantized time; 0 = no gate), got {value!r}")
    return float(value)


def engine_fp32_variant(backend: str) -> str:
    """The side-by-side variant name of ``backend``'s own FP32 model (``report.side_by_side``)."""
    return f"{backend} fp32"


def engine_gain_text(gain: float | None, engine_fp32_ms: float | None, backend: str | None) -> str | None:
    """"1.85× the same engine's FP32 (onnxruntime 0.031 ms)": what the precision adds over the
    engine running FP32, apart from what the engine itself adds over TensorFlow. None: not timed."""
    if gain is None or engine_fp32_ms is None:
        return None
    return f"{gain:.2f}× the same engine's FP32 ({backend or 'engine'} {engine_fp32_ms:.3f} ms)"


def speed_text(precision: str | None, latency_ms: float | None, fp32_latency_ms: float | None) -> str:
    """"INT8 x ms vs FP32 y ms (z×)" (batch 1), the wording of reports and blessing messages."""
    if latency_ms is None or fp32_latency_ms is None:
        return f"{(precision or 'int8').upper()} vs FP32 speed not measured"
    return (f"{(precision or 'int8').upper()} {latency_ms:.3f} ms vs FP32 {fp32_latency_ms:.3f} ms "
            f"({fp32_latency_ms / latency_ms:.2f}×)")
