"""The Quantizer's sharded evaluation (issue 19 items 1-3): FP32 once and persisted, a trial's
chunks over the split's shards (in this process or as Beam work on the DirectRunner's worker
processes), states merged by a CombineFn — equal to the in-process evaluation to 1e-9 on the
digits model — and a resumed run that reuses the FP32 results."""
from __future__ import annotations

import os

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import pytest
import tensorflow as tf

from components.quantizer.sharded_eval import (
    META, PairedStateCombineFn, ShardedChunks, ShardedSplit, shard_path, worker_options,
)
from nano_tfx.backends.base import BackendOptions
from nano_tfx.criterion import AccuracyCriterion
from nano_tfx.metric_states import state_for
from nano_tfx.tuning.paired_eval import InProcessChunks, PairedEvaluation, TrialModel


def _feature(values: np.ndarray) -> tf.train.Feature:
    values = np.ravel(values)
    if values.dtype.kind == "f":
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))


def write_split(directory: str, columns: dict, files: int, gzip: bool = True) -> list[str]:
    """``columns`` (name -> array, rows first) as transformed tf.Examples in ``files`` files."""
    os.makedirs(directory, exist_ok=True)
    n = len(next(iter(columns.values())))
    paths = []
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        path = os.path.join(directory, f"data-{f:05d}-of-{files:05d}" + (".gz" if gzip else ""))
        with tf.io.TFRecordWriter(path, "GZIP" if gzip else "") as w:
            for i in rows:
                feats = {k: _feature(v[i]) for k, v in columns.items()}
                w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(keras3_cnn, digits, tmp_path_factory):
    """The digits CNN as a SavedModel, an ONNX Runtime INT8 candidate saved like a trial, and the
    digits test images (3 noisy copies, ~1 500 rows) as a 3-file transformed split."""
    from nano_tfx.interchange import to_saved_model

    root = tmp_path_factory.mktemp("sharded")
    _, (xte, yte) = digits
    rng = np.random.default_rng(3)
    xs = np.concatenate([np.clip(xte + rng.normal(0, 0.05, xte.shape), 0, 1) for _ in range(3)]).astype("float32")
    ys = np.tile(yte, 3)
    source = to_saved_model(keras3_cnn, str(root / "work"))
    name = source.input_names[0]
    files = write_split(str(root / "Split-eval"), {name: xs, "label": ys}, files=3)
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=xte[:100])
    artifact = str(root / "trial")
    q.save(artifact)
    split = ShardedSplit.plan(files, {name: ("float32", (8, 8, 1))}, ("label", "int64", ()), [name],
                              min_shards=4, batch_size=128)
    return dict(root=root, source=source, xs=xs, ys=ys, q=q, split=split,
                trial=TrialModel(run=q._candidate.run, artifact_dir=artifact, backend="onnxruntime"))


def _chunks(setup, fp32_dir, **kwargs):
    return ShardedChunks(setup["split"], setup["source"], "digits-fp", str(fp32_dir), **kwargs)


@pytest.mark.parametrize("metric", ["accuracy", "sparse_categorical_crossentropy"])
def test_sharded_evaluation_equals_the_in_process_one(setup, metric, tmp_path):
    """The same numbers from the shards (FP32 results read back from disk, a chunk's rows picked
    by key) as from the in-process evaluator over the same rows: FP32, INT8 and their difference."""
    m = state_for(metric)
    sharded = _chunks(setup, tmp_path / "fp32")
    assert sharded.n == len(setup["ys"]) and len(setup["split"].shards) == 6  # 3 files x 2 parts
    whole = sharded.chunk_state(m, setup["trial"], 0, sharded.n)
    batches = [([setup["xs"][i:i + 100]], setup["ys"][i:i + 100]) for i in range(0, len(setup["ys"]), 100)]
    ref = InProcessChunks(batches, lambda xs: TrialModelRunFp32(setup)(xs))
    in_proc = ref.chunk_state(m, setup["trial"], 0, ref.n)
    assert m.count(whole) == m.count(in_proc) == len(setup["ys"])
    for got, want in zip(m.result(whole), m.result(in_proc)):
        assert got == pytest.approx(want, abs=1e-9)
    assert m.result(sharded.fp32_state(m))[0] == pytest.approx(m.result(ref.fp32_state(m))[0], abs=1e-9)
    # chunks partition the split: their merged states are the whole one
    parts = [sharded.chunk_state(m, setup["trial"], lo, hi)
             for lo, hi in zip([0] + sharded.ends[:-1], sharded.ends)]
    merged = m.merge(parts)
    assert m.count(parts[0]) == sharded.ends[0]
    np.testing.assert_allclose(merged, whole, rtol=0, atol=1e-9)
    # the CombineFn merges like PairedMetric.merge
    fn = PairedStateCombineFn(m)
    acc = fn.merge_accumulators([fn.add_input(fn.create_accumulator(), p) for p in parts])
    np.testing.assert_allclose(fn.extract_output(acc), whole, rtol=0, atol=1e-9)
    # and the exact metric of the whole split is the evaluator's own
    if metric == "accuracy":
        want = float(np.mean(setup["q"].predict(setup["xs"], batch_size=256).argmax(-1) == setup["ys"]))
        assert m.result(whole)[1] == pytest.approx(want, abs=1e-9)


class TrialModelRunFp32:
    """The FP32 SavedModel's run (the in-process reference)."""

    def __init__(self, setup):
        from nano_tfx.backends.tf_reference import TFSignatureCandidate

        self.run = TFSignatureCandidate(setup["source"]).run

    def __call__(self, xs):
        return self.run(xs)


@pytest.mark.parametrize("mode", [
    "multi_threading",
    # worker processes import TensorFlow per pipeline (~1 min each on a loaded 2-core machine)
    pytest.param("multi_processing", marks=[pytest.mark.slow, pytest.mark.extended]),
])
def test_beam_workers_give_the_same_states(setup, tmp_path, mode):
    """FP32 once and a chunk as Beam work on the DirectRunner's 2 workers (the candidate loaded
    from its saved trial once per worker, Beam's Shared): identical counts and FP32 results."""
    import apache_beam as beam

    m = state_for("accuracy")
    local = _chunks(setup, tmp_path / "local")
    args = [f"--direct_running_mode={mode}", "--direct_num_workers=2"]
    remote = _chunks(setup, tmp_path / "beam", mode="beam", beam_min_rows=0,
                     make_pipeline=lambda: beam.Pipeline(argv=args), worker_threads=1)
    assert remote.pipelines_run == 1 and remote.cuts == local.cuts
    for i in range(len(setup["split"].shards)):
        a = np.load(shard_path(str(tmp_path / "local"), i))
        b = np.load(shard_path(str(tmp_path / "beam"), i))
        np.testing.assert_array_equal(a["key"], b["key"])
        np.testing.assert_allclose(a["y_fp32"], b["y_fp32"], rtol=0, atol=1e-6)
    # no live model: workers load it, with one engine thread each (worker_threads)
    trial = TrialModel(artifact_dir=setup["trial"].artifact_dir, backend="onnxruntime", options=BackendOptions())
    np.testing.assert_array_equal(remote.chunk_state(m, trial, 0, remote.n), local.chunk_state(m, setup["trial"], 0, local.n))
    assert remote.pipelines_run == 2


def test_worker_options_share_the_cores_unless_the_user_set_threads():
    assert worker_options(BackendOptions(), 1).thread_num == 1
    assert worker_options(BackendOptions(thread_num=4), 1).thread_num == 4  # the user's setting wins
    assert worker_options(BackendOptions(), None).thread_num is None
    assert worker_options(None, 2) is None


def test_a_resumed_run_reuses_the_fp32_results(setup, tmp_path):
    first = _chunks(setup, tmp_path / "run1" / "fp32_eval")
    assert first.fp32_source == "computed" and os.path.exists(tmp_path / "run1" / "fp32_eval" / META)
    # the next run keeps its own copy (a resume of the resume finds it) and runs no FP32 pass
    second = _chunks(setup, tmp_path / "run2" / "fp32_eval", previous_dir=str(tmp_path / "run1" / "fp32_eval"),
                     reference=_fail)
    assert second.fp32_source.startswith("reused from") and second.fp32_seconds == 0
    assert os.path.exists(tmp_path / "run2" / "fp32_eval" / META)
    assert second.cuts == first.cuts and second.n == first.n
    again = _chunks(setup, tmp_path / "run2" / "fp32_eval", reference=_fail)
    assert again.fp32_source == "reused"
    # another model (fingerprint) is not reused: computed afresh, nothing of the old one kept
    other = ShardedChunks(setup["split"], setup["source"], "another-model", str(tmp_path / "run2" / "fp32_eval"),
                          previous_dir=str(tmp_path / "run1" / "fp32_eval"))
    assert other.fp32_source == "computed"


def _fail(xs):
    raise AssertionError("the FP32 model ran on a resumed run")


def test_the_sequential_decision_over_shards(setup, tmp_path):
    """PairedEvaluation on the sharded evaluator: a clear pass stops early; the trial's metric
    is the paired estimate; a chunk boundary that is not a schedule end is refused."""
    m = state_for("accuracy")
    chunks = _chunks(setup, tmp_path / "fp32")
    crit = AccuracyCriterion.parse({"absolute": 0.2, "higher_is_better": True})
    paired = PairedEvaluation(m, chunks, crit, confidence=0.99)
    metric, record = paired.evaluate(setup["trial"])
    assert record.decided == "early-pass" and record.examples_evaluated < chunks.n
    assert metric == pytest.approx(paired.fp32_metric + record.metric_int8 - record.metric_fp32, abs=1e-12)
    with pytest.raises(ValueError, match="chunk_schedule ends"):
        chunks.chunk_state(m, setup["trial"], 0, 7)


def test_the_dask_runner_runs_the_sharded_evaluation(setup, tmp_path):
    """The same pipelines on the DaskRunner (a 2-worker distributed.LocalCluster, threads: the
    runner's translation is what is tested; worker processes would only add TF imports)."""
    import apache_beam as beam
    from distributed import LocalCluster

    m = state_for("accuracy")
    local = _chunks(setup, tmp_path / "local")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        args = ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
                f"--dask_client_address={cluster.scheduler_address}", "--dask_partition_size=1"]
        dask = _chunks(setup, tmp_path / "dask", mode="beam", beam_min_rows=0,
                       make_pipeline=lambda: beam.Pipeline(argv=args))
        trial = TrialModel(artifact_dir=setup["trial"].artifact_dir, backend="onnxruntime")
        state = dask.chunk_state(m, trial, 0, dask.n)
    assert dask.pipelines_run == 2 and dask.cuts == local.cuts
    np.testing.assert_array_equal(state, local.chunk_state(m, setup["trial"], 0, local.n))
