"""``trial_evaluation='sequential'`` in one process: FP32 once, then each trial decided on as few
evaluation examples as the criterion needs (the Keras API and the callback; see
``nano_tfx.sequential`` for the rule and ``nano_tfx.metric_states`` for the paired states).

* **FP32 once.** One pass over the evaluation data keeps, per example, the label and the FP32
  model's output (the reference every trial is paired with) and gives the FP32 metric computed by
  the same paired state as the trials (the decision compares like with like).
* **A trial** visits the examples in the fixed hash order (``hash_order``), in growing chunks
  (``chunk_schedule``): each chunk is one streaming pass over the data that runs the candidate on
  that chunk's rows only, then the interval on metric(INT8) − metric(FP32) decides (pass, fail,
  or more examples). On the whole split the decision is exact, as with ``trial_evaluation='full'``.
* **The trial's metric** is the paired estimate ``FP32 metric (whole split) + mean difference on
  the examples seen``: the strategies read it like a full-split metric, and pairing takes the
  example-to-example spread out of it (a step's gain is not drowned by which rows were drawn).

Metrics that do not merge exactly (``state_for`` → None), multi-output models and ``eval_func``
are evaluated on the full split as before.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.metric_states import PairedMetric, state_for
from nano_tfx.sequential import SequentialDecision, SequentialRecord, chunk_schedule, hash_order

RunFn = Callable[[Sequence[np.ndarray]], list]
EVALUATIONS = ("full", "sequential")
#: the first look's size: a collapsed trial is obvious after a few hundred examples
FIRST_CHUNK = 256


def _single(outs: list) -> np.ndarray | None:
    return np.asarray(outs[0]) if len(outs) == 1 else None


class PairedEvaluation:
    """FP32 once + the sequential decision for every trial of one ``quantize`` call."""

    def __init__(self, metric: PairedMetric, evaluation: Any, reference: RunFn, criterion: AccuracyCriterion,
                 confidence: float = 0.99, first: int = FIRST_CHUNK, seed: int = 0):
        self.metric, self.evaluation, self.confidence = metric, evaluation, confidence
        labels, refs = [], []
        for xs, y in evaluation:  # FP32 once: labels and reference outputs, in the data's order
            out = _single(reference(xs))
            if out is None or y is None:
                raise ValueError("paired evaluation needs one output and labels")
            labels.append(np.asarray(y))
            refs.append(out)
        if not labels:
            raise ValueError("calib_dataset: the evaluation data is empty")
        self.y_true, self.y_fp32 = np.concatenate(labels), np.concatenate(refs)
        self.n = len(self.y_true)
        rank = np.empty(self.n, dtype=np.int64)
        rank[hash_order(self.n, seed)] = np.arange(self.n)
        self.rank = rank  # position of example i in the hash order
        self.ends = chunk_schedule(self.n, first=first)
        whole = metric.add(metric.create(), self.y_true, self.y_fp32, self.y_fp32)
        self.fp32_metric = float(metric.result(whole)[0])  # the paired state's own FP32 value
        self.decision = SequentialDecision(criterion, self.fp32_metric, confidence)

    @staticmethod
    def make(evaluator: Any, evaluation: Any, reference: RunFn, criterion: AccuracyCriterion | None,
             confidence: float = 0.99) -> "PairedEvaluation | None":
        """The paired evaluation of a call, or None when the metric/model/data can't be paired
        (then trials are evaluated on the full split as with ``trial_evaluation='full'``)."""
        metric = state_for(evaluator) if evaluator is not None else None
        if metric is None or criterion is None or evaluation is None:
            return None
        try:
            return PairedEvaluation(metric, evaluation, reference, criterion, confidence)
        except ValueError:
            return None

    def evaluate(self, run: RunFn) -> tuple[float, SequentialRecord]:
        """(the trial's metric, its sequential record): chunk by chunk until decided."""
        state = self.metric.create()
        lo = 0
        for end in self.ends:
            state = self._add_chunk(state, run, lo, end)
            lo = end
            verdict, record = self.decision.check(self.metric, state, full=end >= self.n, n_total=self.n)
            if verdict != "continue":
                fp32_seen, int8_seen = self.metric.result(state)
                return self.fp32_metric + (int8_seen - fp32_seen), record
        raise AssertionError("the last chunk is the whole split")  # chunk_schedule ends at n

    def _add_chunk(self, state: np.ndarray, run: RunFn, lo: int, hi: int) -> np.ndarray:
        """One streaming pass: the candidate runs on the rows whose hash rank is in [lo, hi)."""
        start = 0
        for xs, _ in self.evaluation:
            count = len(xs[0])
            idx = np.arange(start, start + count)
            start += count
            keep = (self.rank[idx] >= lo) & (self.rank[idx] < hi)
            if not keep.any():
                continue
            out = _single(run([np.asarray(x)[keep] for x in xs]))
            rows = idx[keep]
            state = self.metric.add(state, self.y_true[rows], self.y_fp32[rows], out)
        return state
