"""Small TFX-shaped models for the serving tests and ``benchmarks/serve_bench.py``.

What a TFX pipeline hands the Quantizer, built without the orchestrator (cheap): a real
tf.Transform output (``tft_beam`` on the raw examples, the pipeline's own ``preprocessing_fn``),
a Trainer-style FP32 SavedModel (``serving_default`` on raw tf.Examples +
``from_transformed_features``, the pipeline's own ``make_model``), then per backend the
Quantizer executor's own layout writer (``Executor._write_model``) -> ``Format-Serving/``.
"""
from __future__ import annotations

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


def write_transform(root: str, examples: list[bytes], preprocessing_fn: Callable) -> tuple[str, dict]:
    """A tf.Transform output (what TFX's Transform writes) analysed on ``examples``.
    Returns (transform_graph dir, parsed raw features as numpy)."""
    import apache_beam as beam
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    started = time.time()
    transform_dir = os.path.join(root, "transform_graph")
    raw_spec = _raw_spec(examples[0])
    parsed = {k: v.numpy() for k, v in tf.io.parse_example(tf.constant(examples), raw_spec).items()}
    # A few hundred rows are enough for the analyzers here (min/max, mean/var) and keep Beam short.
    rows = [{k: parsed[k][i] for k in parsed} for i in range(min(len(examples), ANALYZE_ROWS))]
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


def build_fp32(root: str, examples: list[bytes], preprocessing_fn: Callable, make_model: Callable,
               label_key: str, transformed_label_key: str, epochs: int = 8) -> tuple[str, str]:
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
    x = {n: xf[n] for n in model.input_names}
    model.fit(x, xf[transformed_label_key], epochs=epochs, batch_size=32, verbose=0)
    model_dir = save_trainer_model(model, transform_dir, label_key, os.path.join(root, "fp32"))
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
                 save_to: Optional[str] = None) -> str:
    """Quantize (one default trial) and write the Quantizer's ``Format-Serving/``; return its path."""
    from tfx.dsl.components.base.base_beam_executor import BaseBeamExecutor
    from tfx.types import standard_artifacts

    from components.quantizer.executor import Executor

    quantized = nano_tfx.quantize(fp32_dir, accelerator=accelerator, calib_dataset=calib,
                                  signature_name="from_transformed_features", sample_size=100)
    artifact = standard_artifacts.Model()
    artifact.uri = os.path.join(out, "quantized_model")
    ctx = BaseBeamExecutor.Context(beam_pipeline_args=[], tmp_dir=os.path.join(out, "tmp"), unique_id="1")
    Executor(ctx)._write_model(quantized, fp32_dir, transform_dir, artifact, None, {})
    if save_to:
        quantized.save(save_to)  # a plain QuantizedModel.save folder (no transform graph)
    return os.path.join(artifact.uri, "Format-Serving")


def digits_models(root: str, epochs: int = 6) -> tuple[str, str]:
    from pipelines.digits import digits_utils
    from pipelines.digits.features import LABEL_KEY, LABEL_XF

    examples, _ = digits_examples("train")
    return build_fp32(root, examples, digits_utils.preprocessing_fn, digits_utils.make_model, LABEL_KEY,
                      LABEL_XF, epochs)


def penguin_models(root: str, epochs: int = 80) -> tuple[str, str]:
    from pipelines.penguin import penguin_utils

    examples, _ = penguin_examples("train")
    return build_fp32(root, examples, penguin_utils.preprocessing_fn, penguin_utils.make_model,
                      penguin_utils.LABEL_KEY, penguin_utils.transformed_name(penguin_utils.LABEL_KEY), epochs)
