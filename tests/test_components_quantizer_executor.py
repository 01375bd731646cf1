"""Quantizer executor tests on real artifacts (penguin FP32 pipeline run once, in a temp dir).

Covers: blessing + TF-Serving-compatible INT8 output, resume from ``previous_report``, an
unreachable Evaluator bar (NOT_BLESSED), an FP32 model the Evaluator did not bless, a model
without the quantizable signature, OpenVINO / ONNX serving layouts, and the trials running as
Beam work on a real distributed engine (DaskRunner on a 2-worker ``distributed.LocalCluster``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile

import nano_tfx  # noqa: F401  (first: oneDNN on before TensorFlow is imported)
import numpy as np
import pytest
import tensorflow as tf
from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
from tfx.types import standard_artifacts

from components import QuantizationReport
from components.quantizer.executor import Executor

PENGUIN_EVAL = os.path.join(
    os.path.dirname(__import__("tfx").__file__), "components", "testdata", "penguin", "data", "Split-eval"
)
SPEED_BAR = 0.5  # see inc_run
BASE_PROPS = {
    "precision": "int8", "calibration_split": "train", "evaluation_split": "eval",
    "sample_size": 100, "signature_name": "from_transformed_features",
}


def _latest(store, type_name, cls, uri_part=""):
    arts = [a for a in store.get_artifacts_by_type(type_name) if uri_part in a.uri]
    art = cls()
    art.set_mlmd_artifact(max(arts, key=lambda a: a.id))
    return art


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """ExampleGen → ... → Trainer → Evaluator of the penguin pipeline (in-memory Beam)."""
    import ml_metadata as mlmd
    from tfx.orchestration import metadata
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines.penguin.pipeline import create_pipeline

    root = tmp_path_factory.mktemp("fp32")
    md = str(root / "metadata.sqlite")
    LocalDagRunner().run(create_pipeline(
        "penguin_fp32", str(root / "pipeline_root"), str(root / "serving"), md, train_steps=100,
        with_quantizer=False))
    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(md))
    return {
        "model": _latest(store, "Model", standard_artifacts.Model),
        "examples": _latest(store, "Examples", standard_artifacts.Examples, "/transformed_examples/"),
        "raw_examples": _latest(store, "Examples", standard_artifacts.Examples, "ExampleGen/examples/"),
        "transform_graph": _latest(store, "TransformGraph", standard_artifacts.TransformGraph),
        "evaluation": _latest(store, "ModelEvaluation", standard_artifacts.ModelEvaluation),
        "model_blessing": _latest(store, "ModelBlessing", standard_artifacts.ModelBlessing),
    }


def _artifact(cls, uri):
    a = cls()
    a.uri = uri
    return a


def run_executor(fp32, out, beam_args=(), inputs=None, **props):
    inputs = {k: [v] for k, v in (inputs or fp32).items() if v is not None}
    outputs = {
        "quantized_model": [_artifact(standard_artifacts.Model, os.path.join(out, "quantized_model"))],
        "blessing": [_artifact(standard_artifacts.ModelBlessing, os.path.join(out, "blessing"))],
        "report": [_artifact(QuantizationReport, os.path.join(out, "report"))],
    }
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=list(beam_args), tmp_dir=os.path.join(out, "tmp"),
                                   unique_id="1")
    Executor(ctx).Do(inputs, outputs, dict(BASE_PROPS, **props))
    with open(os.path.join(out, "report", "report.json")) as f:
        report = json.load(f)
    return {k: v[0] for k, v in outputs.items()}, report


def _raw_eval_examples():
    files = glob.glob(os.path.join(PENGUIN_EVAL, "*"))
    return tf.constant([r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")])


def _fp32_path(fp32):
    return os.path.join(fp32["model"].uri, "Format-Serving")


@pytest.fixture(scope="module")
def inc_run(fp32, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inc"))
    # INC INT8 on stock TF runs this small model at ~1x FP32 on CPUs without VNNI: a gate at 1.0
    # would make these tests a coin toss there. The gate itself is tested below (1e6 / 0).
    return out, run_executor(fp32, out, min_speedup=SPEED_BAR)


def test_inc_int8_blessed_and_serves_raw_examples(fp32, inc_run):
    out, (outputs, report) = inc_run
    blessing, qmodel = outputs["blessing"], outputs["quantized_model"]
    assert blessing.get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    assert os.path.exists(os.path.join(blessing.uri, "BLESSED"))
    # Never a candidate for the Evaluator's LatestBlessedModelStrategy baseline:
    assert not blessing.has_custom_property("current_model_id")
    assert report["tfx"]["baseline_source"] == "evaluator" and report["met"] is True
    assert report["trials"] and all(t["metric"] is not None for t in report["trials"])
    assert qmodel.get_string_custom_property("nano_tfx_backend") == "inc"

    # TF-Serving-compatible: same request (serialized raw tf.Examples) as the FP32 model.
    serving = os.path.join(qmodel.uri, "Format-Serving")
    quantized = tf.saved_model.load(serving)
    assert set(quantized.signatures) == {"serving_default", "from_transformed_features"}
    x = _raw_eval_examples()
    got = quantized.signatures["serving_default"](examples=x)["outputs"].numpy()
    want = tf.saved_model.load(_fp32_path(fp32)).signatures["serving_default"](examples=x)["outputs"].numpy()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.97
    assert not np.allclose(got, want)  # really quantized
    assert nano_tfx.load(serving).backend == "inc"  # nano_tfx.load reads the same directory
    html = open(os.path.join(out, "report", "report.html")).read()
    assert "<table>" in html and "data:image/png;base64," in html and "TFX decision" in html
    # Speed is measured and gated (min_speedup; the Quantizer's default is 1.0).
    assert report["fp32_latency_ms"] > 0 and report["speedup"] >= SPEED_BAR and report["min_speedup"] == SPEED_BAR
    assert all(t["speedup"] > 0 for t in report["trials"])
    assert re.search(r"INT8 [\d.]+ ms vs FP32 [\d.]+ ms \([\d.]+×\)", report["tfx"]["blessing_message"])
    assert blessing.get_float_custom_property("speedup") == pytest.approx(report["speedup"])
    # beside it, the gain over the same engine's FP32 (INC: the frozen FP32 graph)
    assert report["int8_gain"] > 0 and report["engine_fp32_latency_ms"] > 0
    assert blessing.get_float_custom_property("int8_gain") == pytest.approx(report["int8_gain"])
    assert blessing.get_float_custom_property("engine_fp32_latency_ms") == pytest.approx(
        report["engine_fp32_latency_ms"])
    assert report["tfx"]["int8_gain"] == report["int8_gain"]
    assert "ms vs FP32" in html


def test_previous_report_resumes_without_rerunning(fp32, inc_run, tmp_path):
    first_out, (_, first) = inc_run
    inputs = dict(fp32, previous_report=_artifact(QuantizationReport, os.path.join(first_out, "report")))
    outputs, report = run_executor(fp32, str(tmp_path), inputs=inputs, min_speedup=SPEED_BAR)
    assert report["tfx"]["resumed_from"].endswith("report")
    assert [t["status"] for t in report["trials"]] == ["reused"] * len(first["trials"])
    assert not os.path.isdir(os.path.join(str(tmp_path), "report", "trials"))  # no trial ran
    assert outputs["blessing"].get_int_custom_property("blessed") == 1
    x = _raw_eval_examples()
    a = tf.saved_model.load(os.path.join(first_out, "quantized_model", "Format-Serving"))
    b = tf.saved_model.load(os.path.join(outputs["quantized_model"].uri, "Format-Serving"))
    np.testing.assert_allclose(a.signatures["serving_default"](examples=x)["outputs"].numpy(),
                               b.signatures["serving_default"](examples=x)["outputs"].numpy(), rtol=1e-6)


@pytest.mark.parametrize("min_speedup, blessed", [(1e6, False), (0.0, True)])
def test_speed_gate_blocks_a_slow_model_and_zero_switches_it_off(fp32, inc_run, tmp_path, min_speedup, blessed):
    """Same reused trials (resume: no trial re-runs), re-judged against the speed bar: an
    unreachable min_speedup is not blessed whatever the accuracy; 0.0 turns the gate off."""
    first_out, (_, first) = inc_run
    inputs = dict(fp32, previous_report=_artifact(QuantizationReport, os.path.join(first_out, "report")))
    outputs, report = run_executor(fp32, str(tmp_path), inputs=inputs, min_speedup=min_speedup,
                                   max_trials=len(first["trials"]))
    # Only reused trials; without the gate the search may stop earlier (a trial that was accurate
    # but slower than FP32 under the default bar now passes).
    statuses = [t["status"] for t in report["trials"]]
    assert statuses == ["reused"] * len(statuses) and 1 <= len(statuses) <= len(first["trials"])
    if not blessed:
        assert len(statuses) == len(first["trials"])
    assert outputs["blessing"].get_int_custom_property("blessed") == int(blessed), report["tfx"]["blessing_message"]
    assert os.path.exists(os.path.join(outputs["blessing"].uri, "BLESSED" if blessed else "NOT_BLESSED"))
    assert report["fp32_latency_ms"] > 0 and report["speedup"] > 0
    message = report["tfx"]["blessing_message"]
    assert re.search(r"INT8 [\d.]+ ms vs FP32 [\d.]+ ms \([\d.]+×\)", message)
    if not blessed:
        assert "not 1e+06× as fast as FP32" in message and report["met"] is False
        assert all(t["metric"] is not None for t in report["trials"])  # accurate, only too slow
    else:
        assert report["tfx"]["min_speedup"] == 0.0 and report["min_speedup"] is None


def test_unreachable_evaluator_bar_is_not_blessed(fp32, tmp_path):
    """The Evaluator's recorded FP32 value and bound are out of reach: trials run, none passes."""
    from tensorflow_model_analysis.proto import metrics_for_slice_pb2
    from tensorflow_model_analysis.writers import eval_config_writer, metrics_plots_and_validations_writer as w

    src = fp32["evaluation"].uri
    dst = str(tmp_path / "evaluation")
    shutil.copytree(src, dst)
    config, data_location, file_format, model_locations = eval_config_writer.load_eval_run(dst)
    config.metrics_specs[0].metrics[0].threshold.value_threshold.lower_bound.value = 0.9999
    with open(os.path.join(dst, "eval_config.json"), "w") as f:
        f.write(eval_config_writer._serialize_eval_run(config, data_location, file_format, model_locations))
    protos = list(w.load_and_deserialize_metrics(dst))
    for p in glob.glob(os.path.join(dst, "metrics*")):
        os.remove(p)
    with tf.io.TFRecordWriter(os.path.join(dst, "metrics-00000-of-00001.tfrecord")) as writer:
        for proto in protos:
            out = metrics_for_slice_pb2.MetricsForSlice()
            out.CopyFrom(proto)
            for kv in out.metric_keys_and_values:
                if kv.key.name == "sparse_categorical_accuracy":
                    kv.value.double_value.value = 1.0
            writer.write(out.SerializeToString())
    inputs = dict(fp32, evaluation=_artifact(standard_artifacts.ModelEvaluation, dst))
    outputs, report = run_executor(fp32, str(tmp_path / "out"), inputs=inputs, max_trials=2)
    blessing = outputs["blessing"]
    assert blessing.get_int_custom_property("blessed") == 0
    assert os.path.exists(os.path.join(blessing.uri, "NOT_BLESSED"))
    assert report["tfx"]["baseline"] == 1.0
    assert report["tfx"]["effective_criterion"] == {"absolute": pytest.approx(1e-4), "higher_is_better": True}
    assert len(report["trials"]) == 2 and report["met"] is False
    assert "no trial met" in report["tfx"]["blessing_message"]


def test_fp32_not_blessed_means_nothing_blessed(fp32, tmp_path):
    rejected = _artifact(standard_artifacts.ModelBlessing, str(tmp_path / "fp32_blessing"))
    rejected.set_int_custom_property("blessed", 0)
    outputs, report = run_executor(fp32, str(tmp_path / "out"), inputs=dict(fp32, model_blessing=rejected))
    assert outputs["blessing"].get_int_custom_property("blessed") == 0
    assert os.path.exists(os.path.join(outputs["blessing"].uri, "NOT_BLESSED"))
    assert report["trials"] == [] and "did not bless the FP32 model" in report["tfx"]["blessing_message"]
    assert not os.path.exists(os.path.join(outputs["quantized_model"].uri, "Format-Serving"))


def test_without_an_evaluator_the_baseline_is_measured(fp32, tmp_path):
    """No Evaluator wired: the metric must be given; the FP32 baseline is measured on the split."""
    inputs = dict(fp32, evaluation=None, model_blessing=None)
    outputs, report = run_executor(fp32, str(tmp_path / "out"), inputs=inputs, accelerator="onnxruntime",
                                   metric="sparse_categorical_accuracy", max_trials=3,
                                   accuracy_criterion=json.dumps({"absolute": 0.03, "higher_is_better": True}))
    assert report["tfx"]["baseline_source"] == "fp32 run" and report["baseline"] > 0.6
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    with pytest.raises(ValueError, match=r"metric: no metric given and no Evaluator"):
        run_executor(fp32, str(tmp_path / "no_metric"), inputs=inputs)


def test_auto_picks_the_fastest_backend_and_writes_its_layout(fp32, tmp_path):
    # One budget for the whole call under auto: 3 trials = one round, one trial per backend.
    outputs, report = run_executor(fp32, str(tmp_path / "out"), accelerator="auto", max_trials=3,
                                   accuracy_criterion=json.dumps({"absolute": 0.03, "higher_is_better": True}))
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    backends = {t["backend"] for t in report["trials"]}
    assert {"inc", "onnxruntime", "openvino"} <= backends
    chosen = report["trials"][report["chosen"]]
    # the finalists, timed model-only and then (raw_examples wired) as served: parse + tf.Transform
    # + engine on raw eval examples, which decides
    finalists = {int(k): v for k, v in report["selection_latency_ms"].items()}
    served = {int(k): v for k, v in report["served_latency_ms"].items()}
    assert set(served) == set(finalists) and len(served) >= 2
    assert report["chosen"] == min(served, key=served.get)
    assert any("served call path" in n for n in report["tfx"]["notes"])
    # timed as served: behind a `nano-tfx serve` process with the server's defaults, over HTTP
    assert any("finalists timed as served: one `nano-tfx serve` process (TensorFlow 1/1 threads" in n
               for n in report["tfx"]["notes"]), report["tfx"]["notes"]
    serving = os.path.join(outputs["quantized_model"].uri, "Format-Serving")
    assert nano_tfx.load(serving).backend == chosen["backend"]
    assert outputs["quantized_model"].get_string_custom_property("nano_tfx_backend") == chosen["backend"]


class _Unsaveable:
    """A finalist that runs but cannot be written (a full disk): no server can load it."""

    def __init__(self, model):
        self.inputs, self.run = model.inputs, model.run

    def save(self, path):
        raise OSError(28, "No space left on device")


def test_served_timing_runs_behind_a_server_and_falls_back_here(fp32, tmp_path):
    """``ServedCallPath.time_side_by_side``: the finalists saved as serving layouts and timed
    behind one ``nano-tfx serve`` over HTTP; when that fails, timed here with a note saying so,
    and no temp files are left."""
    from components.quantizer.data import split_file_pattern
    from components.quantizer.served_timing import ServedCallPath, read_raw_examples

    outputs, report = run_executor(fp32, str(tmp_path / "out"), accelerator="onnxruntime", max_trials=1,
                                   accuracy_criterion=json.dumps({"absolute": 0.5, "higher_is_better": True}))
    model = nano_tfx.load(os.path.join(outputs["quantized_model"].uri, "Format-Serving"))
    examples = read_raw_examples(split_file_pattern(fp32["raw_examples"], "eval", what="raw_examples"), limit=4)
    notes: list = []
    path = ServedCallPath(fp32["transform_graph"].uri, None, examples, notes=notes)
    before = set(os.listdir(tempfile.gettempdir()))
    ms = path.time_side_by_side({"a": model, "b": model}, budget_s=0.5)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert "timed as served" in notes[-1] and "failed" not in notes[-1]
    ms = path.time_side_by_side({"a": model, "b": _Unsaveable(model)}, budget_s=0.5)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert "No space left on device" in notes[-1] and "quantizing process" in notes[-1]
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if "nano_tfx_served_timing" in d]


def test_model_without_quantizable_signature_is_rejected(fp32, tmp_path):
    # Only a serving_default with neither a Keras call nor a tf.Transform call to derive the
    # signature from (stock Trainer models are derived: tests/test_quantizer_derive.py).
    plain = str(tmp_path / "plain_model")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(examples):
        return {"outputs": tf.zeros([tf.shape(examples)[0], 3])}

    tf.saved_model.save(tf.Module(), os.path.join(plain, "Format-Serving"), signatures={"serving_default": serve})
    model = _artifact(standard_artifacts.Model, plain)
    with pytest.raises(ValueError, match=r"(?s)no signature .from_transformed_features.*quantizable_signatures"
                                         r".*cannot be derived.*no restorable Keras call"):
        run_executor(fp32, str(tmp_path / "out"), inputs=dict(fp32, model=model))


@pytest.mark.parametrize("accelerator, files", [
    ("openvino", ["model.xml", "model.bin"]),
    ("onnxruntime", ["model.onnx"]),
])
def test_openvino_and_onnx_serving_layouts(fp32, tmp_path, accelerator, files):
    # 100 eval examples: under the default 1 % one flipped prediction already fails; this test is
    # about the serving layout, so allow 3 flips.
    outputs, report = run_executor(fp32, str(tmp_path), accelerator=accelerator, max_trials=3,
                                   accuracy_criterion=json.dumps({"absolute": 0.03, "higher_is_better": True}))
    serving = os.path.join(outputs["quantized_model"].uri, "Format-Serving")
    for name in files + ["SERVING.md", "nano_tfx.json", "transform_graph/transform_fn/saved_model.pb",
                         "transform_graph/transformed_metadata/schema.pbtxt"]:
        assert os.path.exists(os.path.join(serving, name)), name
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    if accelerator == "onnxruntime":
        assert os.path.exists(os.path.join(outputs["quantized_model"].uri, "config.pbtxt"))
    # What nano-tfx serve parses: the FP32 serving_default's raw keys, the label excluded.
    with open(os.path.join(serving, "serving.json")) as f:
        assert json.load(f)["raw_feature_keys"] == sorted(
            ["culmen_length_mm", "culmen_depth_mm", "flipper_length_mm", "body_mass_g"])
    # The documented client path: raw features -> transform_graph -> quantized model.
    import tensorflow_transform as tft

    layer = tft.TFTransformOutput(os.path.join(serving, "transform_graph")).transform_features_layer()
    raw_spec = tft.TFTransformOutput(os.path.join(serving, "transform_graph")).raw_feature_spec()
    raw_spec.pop("species")
    x = _raw_eval_examples()
    transformed = layer(tf.io.parse_example(x, raw_spec))
    model = nano_tfx.load(serving)
    got = model.predict({t.name: transformed[t.name].numpy() for t in model.inputs})
    want = tf.saved_model.load(_fp32_path(fp32)).signatures["serving_default"](examples=x)["outputs"].numpy()
    assert np.mean(np.asarray(got).argmax(-1) == want.argmax(-1)) >= 0.97


@pytest.mark.extended  # ~2 min (two worker processes import TF); the local Beam runner is in the default set
def test_trials_spread_over_a_dask_cluster(fp32, tmp_path):
    """DaskRunner against a real 2-process distributed.LocalCluster runs the trials."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        beam_args = [
            "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
            f"--dask_client_address={cluster.scheduler_address}",
        ]
        # Two workers -> the tuner proposes two configs per batch, one Beam pipeline each batch.
        outputs, report = run_executor(fp32, str(tmp_path), beam_args=beam_args, max_trials=4)
        worker_pids = {w.pid for w in cluster.workers.values() if hasattr(w, "pid")}
    ran = [t for t in report["trials"] if t["status"] == "ok"]
    assert report["tfx"]["beam_runner"].endswith("DaskRunner")
    assert report["tfx"]["trial_parallelism"] == 2
    workers = {t["worker"] for t in ran}
    assert len(ran) >= 2 and len(workers) == 2, report["trials"]
    assert {int(w.rsplit(":", 1)[1]) for w in workers} <= worker_pids


def test_precision_auto_blesses_a_ladder_result_saying_its_precision(fp32, tmp_path):
    """precision='auto' in the Quantizer: the fastest rung that meets the bar is blessed, and the
    message, the blessing's properties and the page say which precision it runs in and why."""
    outputs, report = run_executor(fp32, str(tmp_path / "out"), accelerator="openvino", precision="auto",
                                   max_trials=3, accuracy_criterion=json.dumps({"absolute": 0.03,
                                                                                "higher_is_better": True}))
    blessing, qmodel = outputs["blessing"], outputs["quantized_model"]
    message = report["tfx"]["blessing_message"]
    assert blessing.get_int_custom_property("blessed") == 1, message
    precision = report["result_precision"]
    assert report["precision"] == "auto" and precision in ("int8", "int8+bf16", "bf16", "fp32")
    assert message.startswith(f"{precision.upper()} ") and f"auto chose {precision.upper()} on openvino" in message
    assert blessing.get_string_custom_property("precision") == precision
    assert report["tfx"]["result_precision"] == precision
    chosen = [r for r in report["ladder"] if r["status"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["rung"] == precision and chosen[0]["trial"] == report["chosen"]
    assert {r["rung"] for r in report["ladder"]} == {"int8", "int8+bf16", "bf16", "fp32"}
    serving = os.path.join(qmodel.uri, "Format-Serving")
    assert nano_tfx.load(serving).precision == qmodel.get_string_custom_property("nano_tfx_precision")
    with open(os.path.join(outputs["report"].uri, "report.html")) as f:
        assert "Precision ladder" in f.read()


def test_trial_evaluation_sequential_is_wired_through_the_quantizer(fp32, tmp_path):
    """trial_evaluation='sequential' reaches the engine: every trial records how it was decided
    (penguin's eval split is smaller than the first look, so on the whole split, exactly)."""
    outputs, report = run_executor(fp32, str(tmp_path / "out"), accelerator="onnxruntime", max_trials=2,
                                   trial_evaluation="sequential", confidence=0.95,
                                   accuracy_criterion=json.dumps({"absolute": 0.03, "higher_is_better": True}))
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    assert report["trial_evaluation"] == "sequential"
    seq = report["trials"][report["chosen"]]["sequential"]
    assert seq["decided"] == "full" and seq["confidence"] == 0.95 and seq["examples_evaluated"] == seq["n_total"]
