"""The Quantizer on a Trainer model saved as TFX's stock Keras run_fn saves it (a pipeline nobody
tuned to): only ``serving_default`` (raw tf.Examples) + ``transform_features``, no
``from_transformed_features``. The executor derives that signature from the model's own Keras
call (tf_keras) or cuts it out of ``serving_default``'s graph (Keras 3, what TFX's stock
``tf.keras`` modules build here), quantizes it, and the pushed layout answers raw examples like
the FP32 model.

Cheap artifacts, no orchestrator: the penguin Transform (tft_beam), TFX's own penguin Keras model
(Keras 3) or ours (tf_keras) trained in-process, transformed train/eval splits written as the
Transform component writes them. onnxruntime runs by default; openvino and INC are opt-in
extras (the extended set, NANO_TFX_EXTENDED=1).
"""
from __future__ import annotations

import json
import os
import sys

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import pytest
import tensorflow as tf
from tfx.types import artifact_utils, standard_artifacts

from components.serving.servable import load_servable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402
from test_components_quantizer_executor import _artifact, run_executor  # noqa: E402


def _feature(values: np.ndarray) -> tf.train.Feature:
    values = np.ravel(values)
    if values.dtype.kind == "f":
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))


def _write_transformed_split(transform_dir: str, raw: list[bytes], split_dir: str) -> None:
    """Transformed tf.Examples of ``raw`` as the Transform component writes a split (gzipped)."""
    import tensorflow_transform as tft

    xf = serve_models.transformed_inputs_from(
        transform_dir, raw, list(tft.TFTransformOutput(transform_dir).transformed_feature_spec()))
    os.makedirs(split_dir)
    with tf.io.TFRecordWriter(os.path.join(split_dir, "data.tfrecord.gz"), "GZIP") as w:
        for i in range(len(raw)):
            feats = {k: _feature(v[i]) for k, v in xf.items()}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def _stock_keras3_model():
    """TFX's own penguin Keras module's model (``tf.keras`` = Keras 3 here), its default hparams."""
    from tfx.examples.penguin import penguin_utils_keras

    return penguin_utils_keras._make_keras_model(penguin_utils_keras._get_hyperparameters())


@pytest.fixture(scope="module", params=["keras3", "tf_keras"])
def stock(request, tmp_path_factory):
    """Keras 3 (the stock modules here): no restorable call, cut out of serving_default's graph;
    tf_keras: the restored Keras call."""
    root = str(tmp_path_factory.mktemp(f"stock_{request.param}"))
    make_model = _stock_keras3_model if request.param == "keras3" else None
    fp32_dir, transform_dir = serve_models.penguin_models(root, epochs=15, make_model=make_model,
                                                          save=serve_models.save_stock_trainer_model)
    examples = _artifact(standard_artifacts.Examples, os.path.join(root, "transformed_examples"))
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    for split in ("train", "eval"):
        raw, _ = serve_models.penguin_examples(split)
        _write_transformed_split(transform_dir, raw, os.path.join(examples.uri, f"Split-{split}"))
    model = _artifact(standard_artifacts.Model, os.path.join(root, "model"))
    os.makedirs(model.uri)
    os.symlink(fp32_dir, os.path.join(model.uri, "Format-Serving"))
    return {"flavor": request.param, "model": model, "examples": examples,
            "transform_graph": _artifact(standard_artifacts.TransformGraph, transform_dir)}


def test_stock_trainer_model_has_no_quantizable_signature(stock):
    sigs = tf.saved_model.load(os.path.join(stock["model"].uri, "Format-Serving")).signatures
    assert set(sigs) == {"serving_default", "transform_features"}


# The other layouts from the same derived model: the extended set (NANO_TFX_EXTENDED=1), ~1 min each.
_EXTRA = [pytest.mark.slow, pytest.mark.extended]


@pytest.mark.parametrize("accelerator", ["onnxruntime", pytest.param("openvino", marks=_EXTRA),
                                         pytest.param("", id="inc", marks=_EXTRA)])
def test_quantizer_derives_the_signature_and_serves_raw_examples(stock, tmp_path, accelerator):
    inputs = {k: v for k, v in stock.items() if k != "flavor"}
    outputs, report = run_executor(
        inputs, str(tmp_path), inputs=inputs, accelerator=accelerator, metric="sparse_categorical_accuracy",
        label_key="species_xf", max_trials=4, min_speedup=0,
        accuracy_criterion=json.dumps({"absolute": 0.03, "higher_is_better": True}))
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]
    assert any("derived it from the model's own Keras call" in n for n in report["tfx"]["notes"])
    serving = os.path.join(outputs["quantized_model"].uri, "Format-Serving")
    if not accelerator:  # INC: a TF Serving SavedModel: raw examples in, transform inside
        assert os.path.exists(os.path.join(serving, "saved_model.pb"))
    else:
        for name in ["SERVING.md", "nano_tfx.json", "serving.json", "transform_graph/transform_fn/saved_model.pb"]:
            assert os.path.exists(os.path.join(serving, name)), name
        with open(os.path.join(serving, "serving.json")) as f:
            assert json.load(f)["raw_feature_keys"] == sorted(
                ["culmen_length_mm", "culmen_depth_mm", "flipper_length_mm", "body_mass_g"])
    # The FP32 model beside is the original Trainer model, untouched.
    assert report["tfx"]["fp32_model"] == os.path.join(stock["model"].uri, "Format-Serving")

    raw, _ = serve_models.penguin_examples("eval", with_label=False)
    fp32 = tf.saved_model.load(os.path.join(stock["model"].uri, "Format-Serving"))
    want = fp32.signatures["serving_default"](examples=tf.constant(raw))["outputs"].numpy()
    # What `nano-tfx serve` runs on a request (parse + transform_graph + engine), in-process.
    servable = load_servable(serving)
    assert servable.kind == "examples"
    got = servable.predict({"examples": np.array(raw, dtype=object)})
    assert list(got) == ["outputs"]
    assert np.mean(got["outputs"].argmax(-1) == want.argmax(-1)) >= 0.97
