"""``trial_evaluation='sequential'``: FP32 once, then each trial decided on as few evaluation
examples as the criterion needs (see ``nano_tfx.sequential`` for the rule and
``nano_tfx.metric_states`` for the paired states).

One engine, a pluggable evaluator. ``PairedEvaluation`` owns the decision loop; *where* the rows
of a chunk are evaluated is a ``PairedChunks``:

* ``InProcessChunks`` (the Keras API, the callback, the local Quantizer with one worker's worth
  of data): one pass keeps each example's label and FP32 output in memory; a chunk is a streaming
  pass that runs the candidate on that chunk's rows only.
* ``components.quantizer.sharded_eval.ShardedChunks`` (the TFX Quantizer): FP32 results sharded
  and persisted as Beam work, a chunk evaluated over the shards in parallel, states merged by a
  ``CombineFn`` — the same ``PairedMetric`` states, so both give the same numbers.

* **FP32 once.** ``chunks.fp32_state()``: the paired state of FP32 against itself over the whole
  split — the FP32 metric computed by the same paired state as the trials (like with like).
* **A trial** visits the examples in a fixed hash order, in growing chunks (``chunk_schedule``);
  after each chunk the interval on metric(INT8) − metric(FP32) decides (pass, fail, or more
  examples). On the whole split the decision is exact, as with ``trial_evaluation='full'``.
* **The trial's metric** is the paired estimate ``FP32 metric (whole split) + mean difference on
  the examples seen``: the strategies read it like a full-split metric, and pairing takes the
  example-to-example spread out of it.

Metrics that do not merge exactly (``state_for`` → None), multi-output models and ``eval_func``
are evaluated on the full split as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.metric_states import PairedMetric, state_for
from nano_tfx.sequential import SequentialDecision, SequentialRecord, chunk_schedule, hash_order

RunFn = Callable[[Sequence[np.ndarray]], list]
EVALUATIONS = ("full", "sequential")
#: the first look's size: a collapsed trial is obvious after a few hundred examples
FIRST_CHUNK = 256


@dataclass
class TrialModel:
    """The candidate a chunk is evaluated on: live (``run``, in this process) and, once saved,
    where a worker can load it from (``artifact_dir`` written by ``write_model_dir``)."""

    run: RunFn | None = None
    artifact_dir: str | None = None
    backend: str | None = None
    options: Any = None


class PairedChunks(Protocol):
    """Where the rows of a chunk are evaluated (the pluggable part of ``PairedEvaluation``)."""

    n: int  # examples in the split
    #: True when chunks need the candidate saved (``TrialModel.artifact_dir``): workers load it
    needs_artifact: bool

    def fp32_state(self, metric: PairedMetric) -> np.ndarray:
        """The paired state of FP32 against itself over the whole split."""

    def chunk_state(self, metric: PairedMetric, trial: TrialModel, lo: int, hi: int) -> np.ndarray:
        """The merged paired state of the rows whose hash rank is in [lo, hi)."""


ChunksFactory = Callable[[PairedMetric, Any, RunFn], "PairedChunks | None"]


def _single(outs: list) -> np.ndarray | None:
    return np.asarray(outs[0]) if len(outs) == 1 else None


class InProcessChunks:
    """FP32's per-example outputs in memory; a chunk is one streaming pass in this process."""

    needs_artifact = False

    def __init__(self, evaluation: Any, reference: RunFn, seed: int = 0):
        self.evaluation = evaluation
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

    def fp32_state(self, metric: PairedMetric) -> np.ndarray:
        return metric.add(metric.create(), self.y_true, self.y_fp32, self.y_fp32)

    def chunk_state(self, metric: PairedMetric, trial: TrialModel, lo: int, hi: int) -> np.ndarray:
        """One streaming pass: the candidate runs on the rows whose hash rank is in [lo, hi)."""
        state, start = metric.create(), 0
        for xs, _ in self.evaluation:
            count = len(xs[0])
            idx = np.arange(start, start + count)
            start += count
            keep = (self.rank[idx] >= lo) & (self.rank[idx] < hi)
            if not keep.any():
                continue
            out = _single(trial.run([np.asarray(x)[keep] for x in xs]))
            rows = idx[keep]
            state = metric.add(state, self.y_true[rows], self.y_fp32[rows], out)
        return state


class PairedEvaluation:
    """FP32 once + the sequential decision for every trial of one ``quantize`` call."""

    def __init__(self, metric: PairedMetric, chunks: PairedChunks, criterion: AccuracyCriterion,
                 confidence: float = 0.99, first: int = FIRST_CHUNK):
        self.metric, self.chunks, self.confidence = metric, chunks, confidence
        self.n = chunks.n
        self.ends = chunk_schedule(self.n, first=first)
        self.fp32_metric = float(metric.result(chunks.fp32_state(metric))[0])  # the paired state's own FP32
        self.decision = SequentialDecision(criterion, self.fp32_metric, confidence)

    @property
    def needs_artifact(self) -> bool:
        return bool(getattr(self.chunks, "needs_artifact", False))

    @staticmethod
    def make(evaluator: Any, evaluation: Any, reference: RunFn, criterion: AccuracyCriterion | None,
             confidence: float = 0.99, chunks: ChunksFactory | None = None) -> "PairedEvaluation | None":
        """The paired evaluation of a call, or None when the metric/model/data can't be paired
        (then trials are evaluated on the full split as with ``trial_evaluation='full'``).
        ``chunks``: a factory of the evaluator (e.g. the Quantizer's sharded Beam one); it may
        return None, then chunks are evaluated in this process."""
        metric = state_for(evaluator) if evaluator is not None else None
        if metric is None or criterion is None or evaluation is None:
            return None
        try:
            where = chunks(metric, evaluation, reference) if chunks is not None else None
            return PairedEvaluation(metric, where or InProcessChunks(evaluation, reference), criterion, confidence)
        except ValueError:
            return None

    def evaluate(self, run: RunFn | TrialModel) -> tuple[float, SequentialRecord]:
        """(the trial's metric, its sequential record): chunk by chunk until decided."""
        trial = run if isinstance(run, TrialModel) else TrialModel(run=run)
        state = self.metric.create()
        lo = 0
        for end in self.ends:
            state = self.metric.merge([state, self.chunks.chunk_state(self.metric, trial, lo, end)])
            lo = end
            verdict, record = self.decision.check(self.metric, state, full=end >= self.n, n_total=self.n)
            if verdict != "continue":
                fp32_seen, int8_seen = self.metric.result(state)
                return self.fp32_metric + (int8_seen - fp32_seen), record
        raise AssertionError("the last chunk is the whole split")  # chunk_schedule ends at n

    def whole_split_metric(self, trial: TrialModel) -> float:
        """The candidate's metric on the whole split from the paired state (one pass over all
        rows): the chosen model's final metric where chunks are evaluated out of process."""
        return float(self.metric.result(self.chunks.chunk_state(self.metric, trial, 0, self.n))[1])
