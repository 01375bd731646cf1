"""Small TFX-shaped models for the serving tests and ``benchmarks/serve_bench.py``.

What a TFX pipeline hands the Quantizer, built without the orchestrator (cheap): a real
tf.Transform output (``tft_beam`` on the raw examples, the pipeline's own ``preprocessing_fn``),
a Trainer-style FP32 SavedModel (``serving_default`` on raw tf.Examples +
``from_transformed_features``, the pipeline's own ``make_model``), then per backend the
Quantizer executor's own layout writer (``Executor._write_model``) -> ``Format-Serving/``.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import time
from typing import Callable, Optional

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import tensorflow as tf

logger = logging.getLogger("nano_tfx")
ANALYZE_ROWS = 200
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_DATA = os.path.join(REPO, "pipelines", "digits", "data")
PENGUIN_DATA = os.path.join(os.path.dirname(__import__("tfx").__file__), "components", "testdata", "penguin", "data")


def _int64(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))


def _float(v):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)]))


def digits_examples(split: str, with_label: bool = True) -> tuple[list[bytes], np.ndarray]:
    """(serialized raw tf.Examples as CsvExampleGen writes them, labels) of a digits split."""
    from pipelines.digits.features import LABEL_KEY

    out, labels = [], []
    with open(os.path.join(DIGITS_DATA, split, "digits.csv")) as f:
        for row in csv.DictReader(f):
            feats = {k: _int64(v) for k, v in row.items() if with_label or k != LABEL_KEY}
            out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
            labels.append(int(row[LABEL_KEY]))
    return out, np.array(labels)


def penguin_examples(split: str, with_label: bool = True) -> tuple[list[bytes], np.ndarray]:
    from pipelines.penguin.penguin_utils import LABEL_KEY

    files = glob.glob(os.path.join(PENGUIN_DATA, f"Split-{split}", "*"))
    out, labels = [], []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        ex = tf.train.Example.FromString(record.numpy())
        labels.append(ex.features.feature[LABEL_KEY].int64_list.value[0])
        if not with_label:
            del ex.features.feature[LABEL_KEY]
        out.append(ex.SerializeToString())
    return out, np.array(labels)


def quantizer_sample(examples: list[bytes], n: int = 100) -> list[bytes]:
    """The ``n`` calibration examples the Quantizer draws from a split: the smallest content hashes
    (``components.quantizer.data``), i.e. spread over the split. Not its first ``n``: TFX's
    penguin split files are ordered by species, and the first 100 train rows cover two of the
    three (body mass up to +0.9 sd where eval reaches +2.5), so INT8 clipped the third species'
    activations and flipped 2-6 of 100 eval classes on OpenVINO / ONNX Runtime."""
    import heapq

    from components.quantizer.data import _hash_key

    return heapq.nsmallest(n, examples, key=_hash_key)


def _raw_spec(example: bytes) -> dict:
    ex = tf.train.Example.FromString(example)
    spec = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        spec[key] = tf.io.FixedLenFeature([], {"int64_list": tf.int64, "float_list": tf.float32}.get(kind, tf.string))
    return spec


def _instance(example: bytes, raw_spec: dict) -> dict:
    """One raw example in tf.Transform's instance-dict format (a list for a VarLenFeature)."""
    parsed = tf.io.parse_single_example(example, raw_spec)
    return {k: (v.values.numpy() if isinstance(v, tf.SparseTensor) else v.numpy()) for k, v in parsed.items()}


def write_transform(root: str, examples: list[bytes], preprocessing_fn: Callable, raw_spec: Optional[dict] = None,
                    analyze_rows: int = ANALYZE_ROWS) -> tuple[str, dict]:
    """A tf.Transform output (what TFX's Transform writes) analysed on ``examples``; ``raw_spec``
    defaults to dense features typed like the first example.
    Returns (transform_graph dir, parsed raw features as numpy; sparse ones as their values)."""
    import apache_beam as beam
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    started = time.time()
    transform_dir = os.path.join(root, "transform_graph")
    raw_spec = raw_spec or _raw_spec(examples[0])
    parsed = {k: (v.values if isinstance(v, tf.SparseTensor) else v).numpy()
              for k, v in tf.io.parse_example(tf.constant(examples), raw_spec).items()}
    # A few hundred rows are enough for the analyzers here (min/max, mean/var) and keep Beam short.
    if any(isinstance(v, tf.io.VarLenFeature) for v in raw_spec.values()):
        rows = [_instance(ex, raw_spec) for ex in examples[:analyze_rows]]
    else:
        rows = [{k: parsed[k][i] for k in parsed} for i in range(min(len(examples), analyze_rows))]
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_spec))
    # The in-process FnApiRunner: Beam 2.74's DirectRunner first tries Prism (downloads a binary).
    with beam.Pipeline(runner=FnApiRunner()) as p, tft_beam.Context(temp_dir=os.path.join(root, "tft_tmp")):
        transform_fn = (p | beam.Create(rows), metadata) | tft_beam.AnalyzeDataset(preprocessing_fn)
        _ = transform_fn | tft_beam.WriteTransformFn(transform_dir)
    # What TFX's Transform writes beside it (raw_feature_spec() reads it).
    metadata_io.write_metadata(metadata, os.path.join(transform_dir, tft.TFTransformOutput.RAW_METADATA_DIR))
    logger.info("tf.Transform analysed in %.1fs", time.time() - started)
    return transform_dir, parsed


def save_trainer_model(model, transform_dir: str, label_key: Optional[str], model_dir: str) -> str:
    """Save like the Trainer: ``serving_default`` (raw tf.Examples) + ``from_transformed_features``."""
    import tensorflow_transform as tft

    from components import quantizable_signatures

    tft_output = tft.TFTransformOutput(transform_dir)
    tf.saved_model.save(model, model_dir, signatures=quantizable_signatures(model, tft_output, label_key))
    return model_dir


def save_stock_trainer_model(model, transform_dir: str, label_key: Optional[str], model_dir: str) -> str:
    """Save as TFX's stock Keras ``run_fn`` does (``taxi_utils_native_keras``): ``serving_default``
    (raw tf.Examples -> TFT layer -> model, output ``outputs``) + ``transform_features`` only."""
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(transform_dir)
    model.tft_layer_inference = tft_output.transform_features_layer()
    model.tft_layer_eval = tft_output.transform_features_layer()
    raw_spec = tft_output.raw_feature_spec()
    serving_spec = {k: v for k, v in raw_spec.items() if k != label_key}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_tf_examples_fn(serialized):
        transformed = model.tft_layer_inference(tf.io.parse_example(serialized, serving_spec))
        return {"outputs": model(transformed)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def transform_features_fn(serialized):
        return model.tft_layer_eval(tf.io.parse_example(serialized, raw_spec))

    tf.saved_model.save(model, model_dir, signatures={"serving_default": serve_tf_examples_fn,
                                                      "transform_features": transform_features_fn})
    return model_dir


def build_fp32(root: str, examples: list[bytes], preprocessing_fn: Callable, make_model: Callable,
               label_key: str, transformed_label_key: str, epochs: int = 8,
               save: Callable = save_trainer_model) -> tuple[str, str]:
    """(Trainer-style FP32 SavedModel dir, transform_graph dir) trained on ``examples``."""
    import tensorflow_transform as tft
    import tf_keras as keras

    from nano_tfx import skip_autograph_for_tf_keras

    transform_dir, parsed = write_transform(root, examples, preprocessing_fn)
    started = time.time()
    skip_autograph_for_tf_keras()
    keras.utils.set_random_seed(0)
    xf = tft.TFTransformOutput(transform_dir).transform_features_layer()(
        {k: tf.constant(v) for k, v in parsed.items()})
    model = make_model()
    x = {n: xf[n] for n in (getattr(model, "input_names", None) or [t.name for t in model.inputs])}
    model.fit(x, xf[transformed_label_key], epochs=epochs, batch_size=32, verbose=0)
    model_dir = save(model, transform_dir, label_key, os.path.join(root, "fp32"))
    logger.info("FP32 model trained and saved in %.1fs", time.time() - started)
    return model_dir, transform_dir


def transformed_inputs_from(transform_dir: str, examples: list[bytes], names: list[str]) -> dict:
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(transform_dir)
    parsed = tf.io.parse_example(tf.constant(examples), tft_output.raw_feature_spec())
    xf = tft_output.transform_features_layer()(parsed)
    return {n: xf[n].numpy() for n in names}


def transformed_inputs(fp32_dir: str, transform_dir: str, examples: list[bytes]) -> dict:
    """The model's transformed input features of ``examples`` (calibration data; labelled examples)."""
    from nano_tfx.interchange import describe_saved_model

    source = describe_saved_model(fp32_dir, "from_transformed_features")
    return transformed_inputs_from(transform_dir, examples, [t.name for t in source.inputs])


def write_layout(fp32_dir: str, transform_dir: str, calib: dict, accelerator: Optional[str], out: str,
                 save_to: Optional[str] = None, raw_examples: Optional[list] = None) -> str:
    """Quantize (one default trial) and write the Quantizer's ``Format-Serving/``; return its path.
    ``raw_examples``: 'auto' chooses among the engines through the served call path on them, as the
    Quantizer does when it gets ``raw_examples``."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.quantizer import serving
    from components.quantizer.executor import Executor
    from components.quantizer.served_timing import served_call_path

    call_path = None
    if raw_examples and accelerator == "auto":
        call_path = served_call_path(transform_dir, serving.raw_parse_keys(fp32_dir), raw_examples)
    quantized = nano_tfx.quantize(fp32_dir, accelerator=accelerator, calib_dataset=calib,
                                  signature_name="from_transformed_features", sample_size=100, call_path=call_path)
    artifact = standard_artifacts.Model()
    artifact.uri = os.path.join(out, "quantized_model")
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=[], tmp_dir=os.path.join(out, "tmp"), unique_id="1")
    Executor(ctx)._write_model(quantized, fp32_dir, transform_dir, artifact, None)
    if save_to:
        quantized.save(save_to)  # a plain QuantizedModel.save folder (no transform graph)
    return os.path.join(artifact.uri, "Format-Serving")


def digits_models(root: str, epochs: int = 6) -> tuple[str, str]:
    from pipelines.digits import digits_utils
    from pipelines.digits.features import LABEL_KEY, LABEL_XF

    examples, _ = digits_examples("train")
    return build_fp32(root, examples, digits_utils.preprocessing_fn, digits_utils.make_model, LABEL_KEY,
                      LABEL_XF, epochs)


def penguin_models(root: str, epochs: int = 80, make_model: Optional[Callable] = None,
                   save: Callable = save_trainer_model) -> tuple[str, str]:
    from pipelines.penguin import penguin_utils

    examples, _ = penguin_examples("train")
    return build_fp32(root, examples, penguin_utils.preprocessing_fn, make_model or penguin_utils.make_model,
                      penguin_utils.LABEL_KEY, penguin_utils.transformed_name(penguin_utils.LABEL_KEY), epochs,
                      save)


# -- Chicago taxi: TFX's own example module, untouched (a pipeline nobody tuned to) -----------------
TAXI_MODULE = "tfx.examples.chicago_taxi_pipeline.taxi_utils_native_keras"
TAXI_DATA = os.path.join(os.path.dirname(__import__("tfx").__file__), "examples", "chicago_taxi_pipeline", "data",
                         "simple", "data.csv")
TAXI_LABEL = "tips"
# The column types CsvExampleGen infers for the whole file (a column's first rows can mislead).
_TAXI_FLOAT = {"fare", "pickup_latitude", "pickup_longitude", "dropoff_latitude", "dropoff_longitude",
               "trip_miles", "tips"}
_TAXI_STRING = {"payment_type", "company"}


def _taxi_feature(key: str, value: str) -> tf.train.Feature:
    if key in _TAXI_FLOAT:
        return _float(value)
    if key in _TAXI_STRING:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    return _int64(value)


def taxi_examples(start: int, stop: int, with_label: bool = True) -> list[bytes]:
    """Rows [start, stop) of the taxi CSV as CsvExampleGen writes them: an empty field is a
    missing feature (the stock ``preprocessing_fn`` fills it in)."""
    out = []
    with open(TAXI_DATA) as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= stop:
                break
            if i >= start:
                feats = {k: _taxi_feature(k, v) for k, v in row.items() if v != "" and (with_label or k != TAXI_LABEL)}
                out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out


def taxi_raw_spec() -> dict:
    """What SchemaGen + Transform give the taxi columns: every one may be missing -> VarLenFeature."""
    with open(TAXI_DATA) as f:
        keys = next(csv.reader(f))
    return {k: tf.io.VarLenFeature(tf.float32 if k in _TAXI_FLOAT else tf.string if k in _TAXI_STRING else tf.int64)
            for k in keys}


def taxi_models(root: str, rows: int = 2000, epochs: int = 3, analyze_rows: int = 1000) -> tuple[str, str]:
    """(FP32 Trainer SavedModel, transform_graph) of the stock taxi module: its ``preprocessing_fn``
    and ``_build_keras_model`` (Keras 3 wide & deep, int32 + float inputs), ~190 training steps."""
    import importlib

    import keras
    import tensorflow_transform as tft

    taxi = importlib.import_module(TAXI_MODULE)
    examples = taxi_examples(0, rows)
    transform_dir, _ = write_transform(root, examples, taxi.preprocessing_fn, taxi_raw_spec(), analyze_rows)
    started = time.time()
    keras.utils.set_random_seed(0)
    tft_output = tft.TFTransformOutput(transform_dir)
    xf = tft_output.transform_features_layer()(tf.io.parse_example(tf.constant(examples), tft_output.raw_feature_spec()))
    model = taxi._build_keras_model()
    x = {k: xf[k] for k in model.input_names} if getattr(model, "input_names", None) else \
        {t.name: xf[t.name] for t in model.inputs}
    model.fit(x, xf[taxi._transformed_name(TAXI_LABEL)], epochs=epochs, batch_size=32, verbose=0)
    model_dir = save_trainer_model(model, transform_dir, TAXI_LABEL, os.path.join(root, "fp32"))
    logger.info("taxi FP32 model trained and saved in %.1fs", time.time() - started)
    return model_dir, transform_dir


# -- the server subprocess -----------------------------------------------------------------------
@contextlib.contextmanager
def served(models: dict, first: str, root: str, extra_args: tuple = (), timeout: float = 600):
    """``nano-tfx serve`` of every ``models`` folder (name -> path) in a subprocess: yields
    (process, port, log path) once ready (RuntimeError with the log's tail if it is not), and
    always stops it (SIGKILL if a test did not already stop it)."""
    import subprocess
    import sys

    from components.quantizer.served_timing import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", models[first], "--name", first, "--port", str(port),
           *extra_args]
    for name, path in models.items():
        if name != first:
            cmd += ["--model", f"{name}={path}"]
    log = os.path.join(root, "server.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port, log, timeout)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _wait_ready(proc, port: int, log: str, timeout: float) -> None:
    import requests

    deadline = time.time() + timeout
    while True:
        problem = f"server exited {proc.returncode}" if proc.poll() is not None else None
        if problem is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                problem = f"server not ready after {timeout:g}s"
        if problem:
            raise RuntimeError(f"{problem}:\n{open(log).read()[-4000:]}")
        time.sleep(0.5)
