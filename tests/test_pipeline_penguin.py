"""End-to-end: the penguin pipeline with LocalDagRunner and the multi-processing DirectRunner.

ExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher on
TFX's bundled penguin data. Three runs share one pipeline root (upstream components cached):
1. fresh: the INT8 model is blessed and pushed, and agrees with FP32 on raw examples;
2. rerun: the Quantizer resumes from the previous report (no trial re-run); the Evaluator now
   has a baseline model (candidate/baseline naming);
3. an unreachable Evaluator bar: FP32 not blessed → Quantizer NOT_BLESSED → nothing pushed.

The whole module is in the extended set (``NANO_TFX_EXTENDED=1``): the default run covers the
same end-to-end path with the digits demo (``test_pipeline_digits.py``, including the resumed
rerun), and the Quantizer's decisions with the executor tests, in a fraction of the time.
"""
from __future__ import annotations

import glob
import json
import os
import time

import nano_tfx  # noqa: F401  (first: oneDNN on before TensorFlow is imported)
import numpy as np
import pytest
import tensorflow as tf

pytestmark = [pytest.mark.slow, pytest.mark.extended]

BEAM_ARGS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
# 100 eval examples: one flipped prediction is a 1 % drop. 2 % keeps the search short and is
# still inside the test's 97 % agreement bar.
CRITERION = {"relative": 0.02, "higher_is_better": True}
PENGUIN_EVAL = os.path.join(
    os.path.dirname(__import__("tfx").__file__), "components", "testdata", "penguin", "data", "Split-eval"
)


def _run(root: str, **knobs) -> dict:
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines.penguin.pipeline import create_pipeline
    from pipelines import component_timings

    md = os.path.join(root, "metadata.sqlite")
    pipeline = create_pipeline(
        "penguin_e2e", os.path.join(root, "pipeline_root"), os.path.join(root, "serving"), md,
        train_steps=100, accuracy_criterion=CRITERION, beam_pipeline_args=BEAM_ARGS, **knobs,
    )
    start = time.time()
    LocalDagRunner().run(pipeline)
    timings = component_timings(md)
    print(f"\npipeline run: {time.time() - start:.0f}s; per component: {json.dumps(timings)}")
    return timings


def _outputs(root: str, component: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "pipeline_root", component, name, "*")),
                  key=lambda p: int(os.path.basename(p)))


def _pushed_versions(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "serving", "*")))


def _report(root: str) -> dict:
    with open(os.path.join(_outputs(root, "Quantizer", "report")[-1], "report.json")) as f:
        return json.load(f)


def _raw_eval_examples():
    files = glob.glob(os.path.join(PENGUIN_EVAL, "*"))
    return tf.constant([r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("penguin"))
    return root, _run(root)


def test_pushed_int8_model_serves_raw_examples_like_fp32(first_run):
    root, timings = first_run
    assert {"ImportExampleGen", "Transform", "Trainer", "Evaluator", "Quantizer", "Pusher"} <= set(timings)
    report = _report(root)
    print(nano_tfx.Report.from_dict(report).table())
    assert report["tfx"]["blessed"] is True, report["tfx"]["blessing_message"]
    assert report["tfx"]["beam_runner"] == "DirectRunner"
    # The local DirectRunner buys nothing for trials: they ran in this (LocalDagRunner's) process.
    assert report["tfx"]["tuning_runner"] == "in-process" and report["tfx"]["trial_parallelism"] == 1
    assert {t["worker"].rsplit(":", 1)[1] for t in report["trials"]} == {str(os.getpid())}

    versions = _pushed_versions(root)
    assert len(versions) == 1
    pushed = tf.saved_model.load(versions[0])
    fp32 = tf.saved_model.load(os.path.join(_outputs(root, "Trainer", "model")[-1], "Format-Serving"))
    x = _raw_eval_examples()
    got = pushed.signatures["serving_default"](examples=x)["outputs"].numpy()
    want = fp32.signatures["serving_default"](examples=x)["outputs"].numpy()
    agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(f"INT8 vs FP32 agreement on {len(want)} raw eval examples: {agreement:.3f}")
    assert agreement >= 0.97
    assert not np.allclose(got, want)  # the pushed model is the quantized one


def test_rerun_resumes_from_previous_report(first_run):
    root, _ = first_run
    before = _report(root)
    timings = _run(root)
    assert timings.get("Quantizer") is not None  # re-executed (its previous_report input changed)
    report = _report(root)
    assert report["tfx"]["resumed_from"]
    assert report["tfx"]["evaluator"]["candidate_name"] == "candidate"  # Evaluator had a baseline now
    assert len(report["trials"]) >= 1
    assert all(t["status"] == "reused" for t in report["trials"]), report["trials"]
    assert [t["key"] for t in report["trials"]] == [t["key"] for t in before["trials"]][: len(report["trials"])]
    assert report["tfx"]["blessed"] is True
    assert len(_pushed_versions(root)) == 2


@pytest.mark.extended  # the executor test covers the same decision in a fraction of the time
def test_unreachable_evaluator_bar_blesses_and_pushes_nothing(first_run):
    root, _ = first_run
    pushed_before = _pushed_versions(root)
    _run(root, accuracy_threshold=1.01)  # accuracy can never exceed 1
    with open(glob.glob(os.path.join(_outputs(root, "Evaluator", "blessing")[-1], "*"))[0]) as f:
        assert os.path.basename(f.name) == "NOT_BLESSED"
    blessing_dir = _outputs(root, "Quantizer", "blessing")[-1]
    assert os.path.exists(os.path.join(blessing_dir, "NOT_BLESSED"))
    assert not os.path.exists(os.path.join(blessing_dir, "BLESSED"))
    report = _report(root)
    assert report["tfx"]["blessed"] is False and report["trials"] == []
    assert _pushed_versions(root) == pushed_before  # the Pusher pushed nothing
