"""TFX's own IMDB text module (``tfx.examples.imdb.imdb_utils_native_keras``: tf.Transform
vocabulary, Keras 3 Embedding + bidirectional LSTM, only a raw-example ``serving_default``) through
``build_pipeline`` with the Quantizer's default accelerator (INC). It used to fail the Quantizer
execution (every INC trial: "You must feed a value for placeholder tensor 'unknown_1' with dtype
resource"). Extended: ~1-2 min of pipeline on 2 cores.
"""
from __future__ import annotations

import csv
import glob
import os
import re

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import pytest

pytestmark = pytest.mark.extended


def test_stock_imdb_module_is_quantized_by_inc_and_pushed(tmp_path):
    import tensorflow as tf
    from tfx import v1 as tfx

    from components.serving.servable import load_servable
    from pipelines.common import build_pipeline
    from pipelines.reviews.pipeline import imdb_data_root
    from pipelines.runners import beam_args, run_local

    def create_pipeline(**kw):
        return build_pipeline(
            example_gen=tfx.components.CsvExampleGen(input_base=imdb_data_root()),
            module="tfx.examples.imdb.imdb_utils_native_keras", label_key="label", transformed_label_key="label_xf",
            train_steps=10, eval_steps=2, hparams=None, accuracy_threshold=0.0, change_threshold=None,
            accelerator=None, accuracy_criterion={"relative": 0.05, "higher_is_better": True}, **kw)

    root = str(tmp_path / "run")
    summary = run_local(create_pipeline, "imdb_stock", root, beam_pipeline_args=beam_args(0, "in_memory"))
    assert summary["component_states"]["Quantizer"] == "COMPLETE", summary
    assert summary["blessed"] and summary["pushed"], summary["message"]
    # the two Dense layers after the loops can be INT8, the 4 MatMuls inside them stay FP32
    assert re.search(r"INT8: [12] of 6 MatMul", summary["message"]), summary["message"]

    # The pushed TF Serving model answers raw text like the Trainer's FP32 model.
    with open(os.path.join(imdb_data_root(), "imdb_small_with_labels.txt")) as f:
        rows = list(csv.DictReader(f))[:40]
    examples = [tf.train.Example(features=tf.train.Features(feature={"text": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[r["text"].encode()]))})).SerializeToString() for r in rows]
    pushed = sorted(glob.glob(os.path.join(root, "serving_model", "*")))[-1]
    servable = load_servable(pushed)
    got = servable.predict({"examples": np.array(examples, dtype=object)})[servable.outputs[0]]
    fp32_dir = glob.glob(os.path.join(root, "pipeline_root", "Trainer", "model", "*", "Format-Serving"))[0]
    want = tf.saved_model.load(fp32_dir).signatures["serving_default"](examples=tf.constant(examples))
    want = want[servable.outputs[0]].numpy()
    assert np.abs(got - want).max() <= 0.1 * float(np.ptp(want)) + 1e-3
