"""Fast tests of the Quantizer's pieces: constructor validation, the Trainer contract
(``quantizable_signatures``), reading Evaluator results in both naming styles, Beam helpers."""
from __future__ import annotations

import json
import os

import nano_tfx  # noqa: F401  (first: oneDNN on before TensorFlow is imported)
import numpy as np
import pytest
import tensorflow as tf
from tfx.types import channel_utils, standard_artifacts

from components import FROM_TRANSFORMED_FEATURES, QuantizationReport, Quantizer, quantizable_signatures
from components.quantizer import beam_runner, eval_result
from components.quantizer.executor import Executor, _signature_io

PENGUIN = os.path.join(
    os.path.dirname(__import__("tfx").__file__), "components", "testdata", "penguin", "data"
)


def _channel(cls):
    return channel_utils.as_channel([cls()])


def _quantizer(**kwargs):
    return Quantizer(
        model=_channel(standard_artifacts.Model),
        examples=_channel(standard_artifacts.Examples),
        transform_graph=_channel(standard_artifacts.TransformGraph),
        **kwargs,
    )


# -- constructor-time validation -------------------------------------------------------------
def test_defaults_and_exec_properties():
    q = _quantizer(accuracy_criterion={"absolute": 0.02})
    props = q.exec_properties
    assert props["precision"] == "int8"
    assert props["signature_name"] == FROM_TRANSFORMED_FEATURES
    assert props["calibration_split"] == "train" and props["evaluation_split"] == "eval"
    assert json.loads(props["accuracy_criterion"]) == {"absolute": 0.02, "higher_is_better": True}
    assert set(q.outputs) == {"quantized_model", "blessing", "report"}
    assert q.outputs["report"].type is QuantizationReport
    assert props["min_speedup"] == 1.0  # never bless a model slower than FP32 by default
    assert _quantizer(min_speedup=0).exec_properties["min_speedup"] == 0.0
    assert _quantizer(min_speedup=None).exec_properties["min_speedup"] == 0.0  # None: no gate


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"accelerator": "tpu"}, r"accelerator: expected one of \[None, 'onnxruntime', 'openvino', 'auto'\]"),
        ({"precision": "int4"}, r"precision: expected one of"),
        ({"accuracy_criterion": {"relative": 1.5}}, r"accuracy_criterion: 'relative' must be < 1"),
        ({"accuracy_criterion": {"relative": 0.01, "absolute": 0.1}}, r"accuracy_criterion: expected exactly one of 'relative' or 'absolute'"),
        ({"accuracy_criterion": {"drop": 0.1}}, r"accuracy_criterion: unknown keys \['drop'\]"),
        ({"accuracy_criterion": 0.01}, r"accuracy_criterion: expected a dict"),
        ({"max_trials": 0}, r"max_trials: expected a positive integer"),
        ({"timeout": -1}, r"timeout: expected finite seconds >= 0"),
        ({"sample_size": 0}, r"sample_size: expected a positive integer"),
        ({"calibration_split": ""}, r"calibration_split: expected a non-empty string"),
        ({"metric": 3}, r"metric: expected a non-empty string"),
        ({"tuning_strategy": "greedy"}, r"tuning_strategy: expected one of"),
        # (INC has bf16 only on CPUs with native BF16: fp16 is refused everywhere)
        ({"accelerator": None, "precision": "fp16"}, r"precision: accelerator=None supports \[.*'int8'\], got 'fp16'"),
        ({"min_speedup": float("nan")}, r"min_speedup: expected a finite number >= 0"),
        ({"min_speedup": -0.5}, r"min_speedup: expected a finite number >= 0"),
        ({"min_speedup": True}, r"min_speedup: expected a finite number >= 0"),
        ({"min_speedup": "1.0"}, r"min_speedup: expected a finite number >= 0"),
    ],
)
def test_bad_parameters_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _quantizer(**kwargs)


def test_pipeline_can_push_fp32_when_the_quantizer_does_not_bless(tmp_path):
    """The documented fallback: a second Pusher of the FP32 model on the Evaluator's blessing."""
    from pipelines.penguin.pipeline import create_pipeline

    args = ("p", str(tmp_path / "root"), str(tmp_path / "serving"), str(tmp_path / "md.db"))
    off = create_pipeline(*args)
    assert "fp32_pusher" not in {c.id for c in off.components}
    on = create_pipeline(*args, fp32_serving_model_dir=str(tmp_path / "fp32"), min_speedup=1.5)
    pushers = {c.id: c for c in on.components if c.id in ("Pusher", "fp32_pusher")}
    assert set(pushers) == {"Pusher", "fp32_pusher"}
    fp32 = pushers["fp32_pusher"]
    assert fp32.inputs["model"].producer_component_id == "Trainer"
    assert fp32.inputs["model_blessing"].producer_component_id == "Evaluator"
    assert pushers["Pusher"].inputs["model_blessing"].producer_component_id == "Quantizer"
    assert next(c for c in on.components if c.id == "Quantizer").exec_properties["min_speedup"] == 1.5


def test_bad_parameters_rejected_when_building_the_pipeline(tmp_path):
    from pipelines.penguin.pipeline import create_pipeline

    with pytest.raises(ValueError, match="accelerator: expected one of"):
        create_pipeline("p", str(tmp_path / "root"), str(tmp_path / "serving"), str(tmp_path / "md.db"),
                        accelerator="gpu")
    with pytest.raises(ValueError, match="accuracy_criterion"):
        create_pipeline("p", str(tmp_path / "root"), str(tmp_path / "serving"), str(tmp_path / "md.db"),
                        accuracy_criterion={"relative": -0.1})


# -- the Trainer contract -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tft_output(tmp_path_factory):
    """A real tf.Transform output of the penguin preprocessing_fn (in-process Beam)."""
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import schema_utils

    from pipelines.penguin import penguin_utils as pu

    root = tmp_path_factory.mktemp("tft")
    spec = {k: tf.io.FixedLenFeature([1], tf.float32) for k in pu.FEATURE_KEYS}
    spec[pu.LABEL_KEY] = tf.io.FixedLenFeature([1], tf.int64)
    files = tf.io.gfile.glob(os.path.join(PENGUIN, "Split-train", "*"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    parsed = tf.io.parse_example(records, spec)
    rows = [{k: parsed[k][i].numpy() for k in spec} for i in range(len(records))]
    metadata = schema_utils.schema_from_feature_spec(spec)
    from tensorflow_transform.tf_metadata import dataset_metadata

    with tft_beam.Context(temp_dir=str(root / "tmp"), force_tf_compat_v1=False):
        transform_fn = (rows, dataset_metadata.DatasetMetadata(metadata)) | tft_beam.AnalyzeDataset(
            pu.preprocessing_fn)
        _ = transform_fn | tft_beam.WriteTransformFn(str(root / "transform_graph"))
    from tensorflow_transform.tf_metadata import metadata_io

    metadata_io.write_metadata(  # the raw schema, as TFX's Transform writes it
        dataset_metadata.DatasetMetadata(metadata),
        str(root / "transform_graph" / tft.TFTransformOutput.RAW_METADATA_DIR))
    return tft.TFTransformOutput(str(root / "transform_graph")), records


def test_quantizable_signatures_serve_raw_and_transformed(tft_output, tmp_path):
    from pipelines.penguin import penguin_utils as pu

    output, records = tft_output
    model = pu.make_model()
    signatures = quantizable_signatures(model, output, label_key=pu.LABEL_KEY)
    assert set(signatures) == {"serving_default", FROM_TRANSFORMED_FEATURES}
    assert "transformed_features" not in signatures  # TFMA reserves that name
    path = str(tmp_path / "model")
    tf.saved_model.save(model, path, signatures=signatures)

    loaded = tf.saved_model.load(path)
    raw = loaded.signatures["serving_default"](examples=tf.constant(records[:16]))["outputs"].numpy()
    raw_features = tf.io.parse_example(records[:16], output.raw_feature_spec())
    transformed = output.transform_raw_features(raw_features)
    fn = loaded.signatures[FROM_TRANSFORMED_FEATURES]
    names = sorted(fn.structured_input_signature[1])
    assert names == sorted(pu.transformed_name(k) for k in pu.FEATURE_KEYS)  # the label is not an input
    direct = fn(**{n: transformed[n] for n in names})["outputs"].numpy()
    np.testing.assert_allclose(raw, direct, rtol=1e-5, atol=1e-5)
    assert _signature_io(path, FROM_TRANSFORMED_FEATURES)[0] == names


def test_model_without_the_signature_gets_a_how_to(tft_output, tmp_path):
    from pipelines.penguin import penguin_utils as pu

    output, _ = tft_output
    model = pu.make_model()
    sigs = quantizable_signatures(model, output, label_key=pu.LABEL_KEY)
    path = str(tmp_path / "plain")
    tf.saved_model.save(model, path, signatures={"serving_default": sigs["serving_default"]})
    with pytest.raises(ValueError) as err:
        _signature_io(path, FROM_TRANSFORMED_FEATURES)
    text = str(err.value)
    assert "has no signature 'from_transformed_features'" in text
    assert "quantizable_signatures(model, tf_transform_output, label_key=LABEL_KEY)" in text


# -- the Evaluator's result, both naming styles ----------------------------------------------
def _write_evaluation(directory, model_specs, metrics, thresholds, validation_ok=True):
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.proto import metrics_for_slice_pb2, validation_result_pb2
    from tensorflow_model_analysis.writers import eval_config_writer

    os.makedirs(directory, exist_ok=True)
    config = tfma.EvalConfig(
        model_specs=model_specs,
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=["island"])],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy", threshold=thresholds),
            tfma.MetricConfig(class_name="ExampleCount"),
        ])],
    )
    with open(os.path.join(directory, "eval_config.json"), "w") as f:
        f.write(eval_config_writer._serialize_eval_run(config, "", "", {}))
    overall = metrics_for_slice_pb2.MetricsForSlice()
    sliced = metrics_for_slice_pb2.MetricsForSlice()
    sliced.slice_key.single_slice_keys.add(column="island", bytes_value=b"Biscoe")
    for (model_name, name, is_diff), value in metrics.items():
        for proto, v in ((overall, value), (sliced, 0.1)):
            kv = proto.metric_keys_and_values.add()
            kv.key.name, kv.key.model_name, kv.key.is_diff = name, model_name, is_diff
            kv.key.example_weighted.value = False
            kv.value.double_value.value = v
    with tf.io.TFRecordWriter(os.path.join(directory, "metrics-00000-of-00001.tfrecord")) as w:
        w.write(sliced.SerializeToString())
        w.write(overall.SerializeToString())
    with tf.io.TFRecordWriter(os.path.join(directory, "validations.tfrecord")) as w:
        w.write(validation_result_pb2.ValidationResult(validation_ok=validation_ok).SerializeToString())
    return directory


def test_read_evaluation_single_model(tmp_path):
    import tensorflow_model_analysis as tfma

    d = _write_evaluation(
        str(tmp_path / "single"), [tfma.ModelSpec(label_key="species")],
        {("", "sparse_categorical_accuracy", False): 0.97, ("", "example_count", False): 100.0},
        tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(lower_bound={"value": 0.9})),
    )
    info = eval_result.read_evaluation(d)
    assert info.candidate_name == "" and info.label_keys == ["species"]
    assert info.first_metric == "sparse_categorical_accuracy"
    assert info.baseline("sparse_categorical_accuracy") == pytest.approx(0.97)  # overall, not the slice
    assert info.value_bounds("sparse_categorical_accuracy") == (0.9, None)
    assert info.validation_ok is True


def test_read_evaluation_candidate_and_baseline(tmp_path):
    import tensorflow_model_analysis as tfma

    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": 0.8}),
        change_threshold=tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER, absolute={"value": -1e-10}),
    )
    d = _write_evaluation(
        str(tmp_path / "pair"),
        [tfma.ModelSpec(name="candidate", label_key="species"),
         tfma.ModelSpec(name="baseline", label_key="species", is_baseline=True)],
        {("candidate", "sparse_categorical_accuracy", False): 0.95,
         ("baseline", "sparse_categorical_accuracy", False): 0.93,
         ("candidate", "sparse_categorical_accuracy", True): 0.02},
        threshold, validation_ok=False,
    )
    info = eval_result.read_evaluation(d)
    assert info.candidate_name == "candidate"
    assert info.baseline("sparse_categorical_accuracy") == pytest.approx(0.95)
    assert info.value_bounds("sparse_categorical_accuracy") == (0.8, None)
    assert info.higher_is_better("sparse_categorical_accuracy") is True
    assert info.validation_ok is False
    assert Executor._fp32_gate(None, info) is not None  # failed validation: nothing to quantize
    metric = eval_result.keras_metric_from_config(info.first_metric_config)
    assert type(metric).__name__ == "SparseCategoricalAccuracy"


def test_evaluator_bounds_tighten_the_criterion():
    crit, note = Executor._effective_criterion({"relative": 0.01, "higher_is_better": True}, 0.95, 0.945, None)
    assert crit == {"absolute": pytest.approx(0.005), "higher_is_better": True} and "tighter" in note
    crit, note = Executor._effective_criterion({"relative": 0.01, "higher_is_better": True}, 0.95, 0.6, None)
    assert crit == {"relative": 0.01, "higher_is_better": True} and note is None
    assert Executor._effective_criterion({"absolute": 0.01, "higher_is_better": True}, 0.5, 0.6, None)[0] is None


# -- Beam helpers ------------------------------------------------------------------------------
def test_trial_parallelism_follows_beam_args():
    assert beam_runner.default_parallelism(["--direct_running_mode=multi_processing", "--direct_num_workers=3"]) == 3
    assert beam_runner.default_parallelism([]) == 1
    assert beam_runner.default_parallelism(["--runner=DataflowRunner", "--max_num_workers=7"]) == 7
    args = beam_runner.with_runner_defaults([f"--runner={beam_runner.DASK_RUNNER}"])
    assert "--dask_partition_size=1" in args  # one trial per Dask partition
    assert beam_runner.with_runner_defaults(["--direct_num_workers=2"]) == ["--direct_num_workers=2"]


def test_trials_run_in_process_on_the_local_direct_runner(tmp_path):
    """Beam only where it buys something: the local DirectRunner (any mode) runs trials in-process."""
    mp = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    for args in ([], mp, ["--runner=DirectRunner", "--direct_running_mode=in_memory"]):
        runner = beam_runner.BeamTrialRunner(args, results_dir=str(tmp_path))
        assert runner.in_process and runner.parallelism == 1 and runner.description == "in-process"
    forced = beam_runner.BeamTrialRunner(mp, results_dir=str(tmp_path), in_process=False)
    assert not forced.in_process and forced.parallelism == 2 and forced.description == "beam:DirectRunner"
    dask = [f"--runner={beam_runner.DASK_RUNNER}"]
    assert not beam_runner.is_local_direct(dask)
    for args in (["--runner=FlinkRunner"], ["--runner=SparkRunner"], ["--runner=DataflowRunner"]):
        assert not beam_runner.is_local_direct(args), args
