"""The sequential, paired decision of one trial: pure functions, no Beam, no models.

Examples are visited in a fixed hash order (``hash_order``), in growing chunks
(``chunk_schedule``). After each chunk the paired state (``nano_tfx.metric_states``) gives a
confidence interval on metric(INT8) − metric(FP32) over the examples seen so far, and ``decide``
compares it with what the criterion allows:

* **pass** when the whole interval lies inside the allowed region,
* **fail** when it lies entirely outside,
* **continue** otherwise — including an interval that *touches* the bound (an end equal to it):
  the data cannot tell which side the trial is on, so it earns more examples, not a verdict;
* on the **full split** the decision is exact, as today: ``criterion.met(baseline, value)``.

The allowed region for the difference d = int8 − fp32 is the one ``AccuracyCriterion.met``
accepts, written on d: ``d ≥ bound − baseline − tol`` (higher is better) or ``d ≤ bound −
baseline + tol`` (lower is better), where ``bound`` is ``criterion.bound(baseline)`` (for a
relative criterion the allowed drop is ``max_drop · |baseline|``, the FP32 baseline on the full
split) and ``tol`` is ``met``'s float tolerance. Using the same region means an early verdict
never contradicts the exact rule at any value inside the interval.

Error rate. ``confidence`` (default 0.99) is per look. A wrong early pass needs the interval to
miss on one side (≤ (1 − confidence)/2 per look); with geometric chunks there are about
log2(N / first) looks on nested data, so the trial-level risk is below that count times 0.5 %
(Bonferroni) and in practice a few times 0.5 %, since the looks are strongly correlated.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.metric_states import Interval, PairedMetric

Verdict = Literal["pass", "fail", "continue"]
Decided = Literal["early-pass", "early-fail", "full"]


def _tolerance(baseline: float) -> float:
    # The float tolerance of AccuracyCriterion.met (kept equal to it; see the report's note on
    # exposing it there as a method).
    return 1e-6 * max(1.0, abs(baseline))


def allowed_difference(baseline: float, criterion: AccuracyCriterion) -> float:
    """The worst metric(INT8) − metric(FP32) the criterion still accepts (negative when higher is
    better, positive when lower is better), including ``met``'s float tolerance."""
    tol = _tolerance(baseline)
    edge = criterion.bound(baseline) - baseline
    return edge - tol if criterion.higher_is_better else edge + tol


def decide(interval: Interval, baseline: float, criterion: AccuracyCriterion, full: bool = False,
           value: float | None = None) -> Verdict:
    """'pass' | 'fail' | 'continue' for an interval of metric(INT8) − metric(FP32).

    ``full``: the interval covers the whole split; then the decision is exact, ``criterion.met(
    baseline, value)`` with ``value`` the INT8 metric on the full split (required)."""
    if full:
        if value is None:
            raise ValueError("decide: on the full split give value=, the INT8 metric on the whole split")
        return "pass" if criterion.met(baseline, value) else "fail"
    low, high = interval
    if math.isnan(low) or math.isnan(high):
        return "continue"
    edge = allowed_difference(baseline, criterion)
    # Strict inequalities: an interval touching the edge is undecided.
    if criterion.higher_is_better:
        if low > edge:
            return "pass"
        if high < edge:
            return "fail"
    else:
        if high < edge:
            return "pass"
        if low > edge:
            return "fail"
    return "continue"


def chunk_schedule(n_total: int, first: int = 256, growth: float = 2.0) -> list[int]:
    """Cumulative chunk ends ``[first, first·growth, …, n_total]`` (strictly increasing ints, the
    last always ``n_total``). Geometric growth keeps the number of looks at ~log(N/first), so the
    overhead over one full pass is at most a factor growth/(growth − 1) of the examples needed."""
    if n_total < 1:
        raise ValueError(f"n_total: expected a positive number of examples, got {n_total}")
    if first < 1:
        raise ValueError(f"first: expected >= 1, got {first}")
    if not growth > 1.0:
        raise ValueError(f"growth: expected > 1, got {growth}")
    ends: list[int] = []
    size = float(first)
    while int(size) < n_total:
        end = int(size)
        if not ends or end > ends[-1]:
            ends.append(end)
        size *= growth
    ends.append(n_total)
    return ends


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fixed, well-mixed uint64 → uint64 map (vectorised)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def stable_hash(keys: int | Sequence[int] | Sequence[bytes | str] | np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 hashes, identical across processes, machines and Python versions (never Python's
    salted ``hash``). ``keys``: a count n (the example indices 0..n−1), integer indices, or
    serialized examples (bytes/str, hashed with keyed BLAKE2b). A Beam worker can hash an example
    on its own, so "the first k in hash order" needs no global shuffle."""
    if isinstance(keys, (int, np.integer)):
        keys = np.arange(int(keys), dtype=np.uint64)
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        salt = _splitmix64(np.array([seed], dtype=np.uint64) & _MASK)[0]
        with np.errstate(over="ignore"):
            return _splitmix64(keys.astype(np.uint64) ^ salt)
    keys = list(keys)
    if keys and all(isinstance(k, (int, np.integer)) for k in keys):
        return stable_hash(np.asarray(keys, dtype=np.int64), seed)
    salt = int(seed).to_bytes(8, "little", signed=True)
    out = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys):
        data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "little")
    return out


def hash_order(keys: int | Sequence[int] | Sequence[bytes | str] | np.ndarray, seed: int = 0) -> np.ndarray:
    """The fixed visiting order: indices into ``keys`` (or 0..n−1) sorted by ``stable_hash``.
    A hash order, not the split's own order, so every prefix is a random-like sample (files are
    often sorted by label or time) yet the same on every run and every worker."""
    return np.argsort(stable_hash(keys, seed), kind="stable")


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class SequentialRecord:
    """What a trial's report records about its sequential evaluation."""

    examples_evaluated: int
    interval: Interval  # of metric(INT8) − metric(FP32) over examples_evaluated, at `confidence`
    decided: Decided  # early-pass | early-fail | full (the exact rule on the whole split)
    confidence: float
    verdict: Literal["pass", "fail"] = "fail"
    n_total: int | None = None  # the split's size, for "4,096 of 100,000"
    metric_fp32: float | None = None  # over examples_evaluated
    metric_int8: float | None = None

    def to_dict(self) -> dict:
        # ±inf (an interval before two examples) as None: reports are strict JSON.
        return {
            "examples_evaluated": int(self.examples_evaluated),
            "interval": [_finite_or_none(self.interval[0]), _finite_or_none(self.interval[1])],
            "decided": self.decided,
            "confidence": float(self.confidence),
            "verdict": self.verdict,
            "n_total": self.n_total,
            "metric_fp32": self.metric_fp32,
            "metric_int8": self.metric_int8,
        }

    @staticmethod
    def from_dict(d: dict) -> "SequentialRecord":
        low, high = d["interval"]
        return SequentialRecord(
            examples_evaluated=int(d["examples_evaluated"]),
            interval=(-math.inf if low is None else float(low), math.inf if high is None else float(high)),
            decided=d["decided"],
            confidence=float(d["confidence"]),
            verdict=d.get("verdict", "fail"),
            n_total=d.get("n_total"),
            metric_fp32=d.get("metric_fp32"),
            metric_int8=d.get("metric_int8"),
        )


@dataclass(frozen=True)
class SequentialDecision:
    """The rule for one trial: criterion, FP32 baseline (full split) and confidence."""

    criterion: AccuracyCriterion
    baseline: float
    confidence: float = 0.99

    def check(self, metric: PairedMetric, state: np.ndarray, full: bool,
              n_total: int | None = None) -> tuple[Verdict, SequentialRecord]:
        """Verdict after a chunk, and the record to keep if it is final ('pass'/'fail')."""
        interval = metric.paired_interval(state, self.confidence)
        fp32, int8 = metric.result(state)
        verdict = decide(interval, self.baseline, self.criterion, full=full, value=int8 if full else None)
        if full:
            decided: Decided = "full"
        else:
            decided = "early-pass" if verdict == "pass" else "early-fail"
        record = SequentialRecord(
            examples_evaluated=metric.count(state), interval=interval, decided=decided,
            confidence=self.confidence, verdict="pass" if verdict == "pass" else "fail",
            n_total=n_total, metric_fp32=fp32, metric_int8=int8,
        )
        return verdict, record


def run_sequential(metric: PairedMetric, chunks: Iterable[tuple[Any, Any, Any]], decision: SequentialDecision,
                   n_total: int) -> tuple[SequentialRecord, np.ndarray]:
    """The in-process loop: add each chunk ``(y_true, y_fp32, y_int8)`` — consecutive slices of
    the split in hash order, ending at the ``chunk_schedule`` boundaries — and stop at the first
    decided look. The last chunk must complete the split (``n_total`` examples): that look is the
    exact one. Returns the record and the state (for the report's metric values)."""
    state = metric.create()
    for y_true, y_fp32, y_int8 in chunks:
        state = metric.add(state, y_true, y_fp32, y_int8)
        seen = metric.count(state)
        verdict, record = decision.check(metric, state, full=seen >= n_total, n_total=n_total)
        if verdict != "continue":
            return record, state
    raise ValueError(f"run_sequential: the chunks ended after {metric.count(state)} of {n_total} examples")
