"""INC (``accelerator=None``) on models with while loops and captured variables: LSTMs (Keras 3 and
tf_keras), a plain ``tf.while_loop``, and the text model cut out of a stock TFX ``serving_default``
(tf.Transform vocabulary in front, ``derive_from_transformed_features``) - TFX's stock IMDB
pipeline failed every INC trial with "You must feed a value for placeholder tensor 'unknown_1'
with dtype resource". A model INC cannot freeze at all is a ``QuantizationFailed`` with its report,
not a crash in the middle of a trial.

Tiny models, real INC: about a minute on 2 cores.
"""
from __future__ import annotations

import os
import sys

import nano_tfx  # noqa: F401  (first: oneDNN)
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402

VOCAB, STEPS = 40, 10


def _keras(flavor: str):
    if flavor == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def _lstm_model(keras, name: str = "tokens"):
    """Embedding -> bidirectional LSTM -> Dense(relu) -> Dense: IMDB's stock model, in small."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((STEPS,), dtype="int64", name=name)
    x = keras.layers.Embedding(VOCAB + 2, 16)(inp)
    x = keras.layers.Bidirectional(keras.layers.LSTM(8))(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    return inp, keras.layers.Dense(1)(x)


def _save_signature(model_fn, spec: tf.TensorSpec, trackable, path: str) -> str:
    """A SavedModel whose serving_default takes the model's input (what a user hands over)."""
    module = tf.Module()
    module.model = trackable

    @tf.function(input_signature=[spec])
    def serve(x):
        return {"outputs": model_fn(x)}

    tf.saved_model.save(module, path, signatures={"serving_default": serve.get_concrete_function()})
    return path


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB + 2, size=(n, STEPS)).astype(np.int64)


def _assert_close(q, want: np.ndarray, x: np.ndarray) -> None:
    got = np.asarray(q.predict(x)).reshape(want.shape)
    assert np.isfinite(got).all()
    # INT8 around the loop (the loop itself stays FP32): the outputs move by a small fraction of their spread
    assert np.abs(got - want).max() <= 0.1 * float(np.ptp(want)) + 1e-4, (got[:4], want[:4])


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_inc_quantizes_an_lstm_saved_model_around_its_loop(flavor, tmp_path):
    keras = _keras(flavor)
    inp, out = _lstm_model(keras)
    model = keras.Model(inp, out)
    path = _save_signature(lambda x: model(x, training=False), tf.TensorSpec([None, STEPS], tf.int64, "tokens"),
                           model, str(tmp_path / "fp32"))
    x = _tokens(64)
    q = nano_tfx.quantize(path, calib_dataset=x, accelerator=None, workdir=str(tmp_path / "work"))
    _assert_close(q, model.predict(x, verbose=0), x)
    int8, total = q.report.int8_ops["MatMul"]
    # 2 MatMuls per LSTM direction inside the loops (FP32) + the 2 Dense layers after them (INT8)
    assert total == 6 and int8 >= 1, q.report.int8_ops


def test_inc_runs_a_tf_while_loop_reading_a_variable(tmp_path):
    """A captured variable read inside a ``tf.while_loop`` body is frozen to a constant; the MatMul
    in the loop stays FP32, the one after it is quantized."""
    rng = np.random.default_rng(1)
    module = tf.Module()
    module.w_loop = tf.Variable(rng.normal(0, 0.3, (16, 16)).astype(np.float32))
    module.w_out = tf.Variable(rng.normal(0, 0.3, (16, 4)).astype(np.float32))

    def model_fn(x):
        def body(i, h):
            return i + 1, tf.tanh(tf.matmul(h, module.w_loop) + x)

        _, h = tf.while_loop(lambda i, h: i < 3, body, (tf.constant(0), x))
        return tf.matmul(h, module.w_out)

    path = _save_signature(model_fn, tf.TensorSpec([None, 16], tf.float32, "x"), module, str(tmp_path / "fp32"))
    x = rng.normal(size=(64, 16)).astype(np.float32)
    q = nano_tfx.quantize(path, calib_dataset=x, accelerator=None, workdir=str(tmp_path / "work"))
    _assert_close(q, model_fn(tf.constant(x)).numpy(), x)
    assert q.report.int8_ops["MatMul"] == [1, 2], q.report.int8_ops


def test_a_model_inc_cannot_freeze_is_quantization_failed_with_its_report(tmp_path):
    """A lookup table in the signature (no variable: freezing cannot fold it) ends the call with
    ``QuantizationFailed`` naming it, and the report holds the failed row."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.range(VOCAB + 2, dtype=tf.int64), tf.range(VOCAB + 2, dtype=tf.int64)),
        default_value=0)
    module = tf.Module()
    module.table = table
    module.w = tf.Variable(np.ones((STEPS, 2), np.float32))

    def model_fn(x):
        return tf.matmul(tf.cast(table.lookup(x), tf.float32), module.w)

    path = _save_signature(model_fn, tf.TensorSpec([None, STEPS], tf.int64, "tokens"), module, str(tmp_path / "fp32"))
    with pytest.raises(nano_tfx.QuantizationFailed, match="not variables") as err:
        nano_tfx.quantize(path, calib_dataset=_tokens(16), accelerator=None, workdir=str(tmp_path / "work"))
    assert isinstance(err.value, RuntimeError)
    assert err.value.report is not None and err.value.report.trials and err.value.report.trials[-1].failed


# -- the stock TFX text model: vocabulary in tf.Transform, LSTM in the model ------------------------
def _text_examples(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(3, STEPS + 4))))
        feats = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
                 "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out


def _preprocessing_fn(inputs):
    """TFX's IMDB ``_tokenize_review``, smaller: words -> vocabulary ids, padded to STEPS, +1."""
    import tensorflow_transform as tft

    tokens = tf.strings.split(tf.reshape(inputs["text"], [-1])).to_sparse()
    ids = tft.compute_and_apply_vocabulary(tokens, default_value=VOCAB, top_k=VOCAB)
    dense = tf.pad(tf.sparse.to_dense(ids, default_value=-1), [[0, 0], [0, STEPS]], constant_values=-1)
    return {"text_xf": tf.slice(dense, [0, 0], [-1, STEPS]) + 1, "label_xf": inputs["label"]}


def test_inc_quantizes_the_text_model_cut_out_of_a_stock_serving_signature(tmp_path):
    import tensorflow_transform as tft

    from components.quantizer.signatures import FROM_TRANSFORMED_FEATURES, derive_from_transformed_features
    from nano_tfx.backends.inc.convert import _frozen_graph
    from nano_tfx.interchange import describe_saved_model, export_signature_as_default

    raw = _text_examples(64)
    spec = {"text": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    transform_dir, _ = serve_models.write_transform(str(tmp_path), raw, _preprocessing_fn, raw_spec=spec)
    keras = _keras("keras3")  # TFX's stock modules build Keras 3 here: the graph-cut derivation
    inp, out = _lstm_model(keras, "text_xf")
    model = keras.Model({"text_xf": inp}, out)
    fp32_dir = serve_models.save_stock_trainer_model(model, transform_dir, "label", str(tmp_path / "fp32"))

    derived = derive_from_transformed_features(fp32_dir, tft.TFTransformOutput(transform_dir), str(tmp_path / "derived"))
    source = describe_saved_model(derived, FROM_TRANSFORMED_FEATURES)
    graph_def, inputs, _ = _frozen_graph(source)  # raised on a captured hash table before the fix
    assert inputs == ["text_xf"]
    assert not [n for n in graph_def.node if n.op in ("HashTableV2", "LookupTableFindV2", "ParseExampleV2")]
    assert any(n.op == "MatMul" for n in graph_def.node)  # the model's ops, not one opaque function call

    quantizable = export_signature_as_default(derived, FROM_TRANSFORMED_FEATURES, str(tmp_path / "quantizable"))
    xf = serve_models.transformed_inputs_from(transform_dir, raw, ["text_xf"])["text_xf"].astype(np.int64)
    q = nano_tfx.quantize(quantizable, calib_dataset=xf, accelerator=None, workdir=str(tmp_path / "work"))
    want = tf.saved_model.load(fp32_dir).signatures["serving_default"](examples=tf.constant(raw))["outputs"].numpy()
    _assert_close(q, want, xf)
    assert q.report.int8_ops["MatMul"][0] >= 1, q.report.int8_ops


# -- the TFX Quantizer on it --------------------------------------------------------------------
def _stock_text_artifacts(root: str, with_lookup: bool) -> dict:
    """The artifacts a stock TFX text pipeline hands the Quantizer: transform graph, transformed
    train/eval splits, and a Keras 3 Trainer model saved like TFX's stock ``run_fn``
    (``serving_default`` on raw tf.Examples only). ``with_lookup``: the model re-maps the ids
    through an ``IntegerLookup`` (a hash table inside the quantized part: INC cannot freeze it)."""
    from tfx.types import artifact_utils, standard_artifacts

    from test_components_quantizer_executor import _artifact
    from test_quantizer_derive import _write_transformed_split

    raw = _text_examples(96)
    spec = {"text": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    transform_dir, _ = serve_models.write_transform(root, raw, _preprocessing_fn, raw_spec=spec)
    keras = _keras("keras3")
    keras.utils.set_random_seed(0)
    inp = keras.Input((STEPS,), dtype="int64", name="text_xf")
    x = keras.layers.IntegerLookup(vocabulary=list(range(1, VOCAB + 2)))(inp) if with_lookup else inp
    x = keras.layers.Embedding(VOCAB + 3, 8)(x)
    x = keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(keras.layers.LSTM(8)(x)))
    model = keras.Model({"text_xf": inp}, x)
    fp32_dir = serve_models.save_stock_trainer_model(model, transform_dir, "label", os.path.join(root, "fp32"))
    examples = _artifact(standard_artifacts.Examples, os.path.join(root, "transformed_examples"))
    examples.split_names = artifact_utils.encode_split_names(["train", "eval"])
    for split, rows in (("train", raw[:64]), ("eval", raw[64:])):
        _write_transformed_split(transform_dir, rows, os.path.join(examples.uri, f"Split-{split}"))
    model_artifact = _artifact(standard_artifacts.Model, os.path.join(root, "model"))
    os.makedirs(model_artifact.uri)
    os.symlink(fp32_dir, os.path.join(model_artifact.uri, "Format-Serving"))
    return {"model": model_artifact, "examples": examples,
            "transform_graph": _artifact(standard_artifacts.TransformGraph, transform_dir)}


def _run_quantizer(artifacts: dict, out: str):
    import json

    from test_components_quantizer_executor import run_executor

    return run_executor(artifacts, out, inputs=artifacts, accelerator=None, metric="binary_accuracy",
                        label_key="label_xf", max_trials=2, min_speedup=0, sample_size=32,
                        accuracy_criterion=json.dumps({"absolute": 1.0, "higher_is_better": True}))


def test_quantizer_with_inc_runs_a_stock_text_model(tmp_path):
    outputs, report = _run_quantizer(_stock_text_artifacts(str(tmp_path), with_lookup=False), str(tmp_path / "out"))
    assert any("derived it from the model's own Keras call" in n for n in report["tfx"]["notes"])
    assert any(t["status"] != "failed" for t in report["trials"]), [t.get("error") for t in report["trials"]]
    assert outputs["blessing"].get_int_custom_property("blessed") == 1, report["tfx"]["blessing_message"]


def test_quantizer_not_blessed_when_inc_cannot_quantize_the_model(tmp_path):
    """Every INC trial impossible (a hash table in the quantized part): the execution finishes,
    NOT_BLESSED, the reason in the blessing message and the report; no quantized model."""
    outputs, report = _run_quantizer(_stock_text_artifacts(str(tmp_path), with_lookup=True), str(tmp_path / "out"))
    blessing = outputs["blessing"]
    assert blessing.get_int_custom_property("blessed") == 0
    assert os.path.exists(os.path.join(blessing.uri, "NOT_BLESSED"))
    message = report["tfx"]["blessing_message"]
    assert "quantization failed (inc)" in message and "not variables" in message, message
    assert report["trials"] and all(t["status"] == "failed" for t in report["trials"]), report["trials"]
    assert not os.path.exists(os.path.join(outputs["quantized_model"].uri, "Format-Serving"))
    assert os.path.exists(os.path.join(outputs["quantized_model"].uri, "NOT_QUANTIZED.txt"))
