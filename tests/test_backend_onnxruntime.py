"""ONNX Runtime backend, called directly (no tuner): real tf2onnx + ORT, no mocks.

One small CNN on sklearn digits (8x8x1, 10 classes) is trained once per module for Keras 3 and
once for tf_keras; every test reuses the prepared ONNX model.
"""
from __future__ import annotations

import gc
import os
import pickle

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from nano_tfx.backends.base import BackendOptions, CalibrationData, TrialConfig, registered
from nano_tfx.backends.onnxruntime import MODEL_FILE, OnnxRuntimeBackend, OrtCandidate, cpu_has_vnni
from nano_tfx.interchange import to_saved_model

N_CALIB = 100
CALIB_BATCH = 10


class DigitsCalibration(CalibrationData):
    def __init__(self, x: np.ndarray, batch_size: int = CALIB_BATCH):
        self.x = x
        self.batch_size = batch_size
        self.num_samples = len(x)

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            yield [self.x[i : i + self.batch_size]]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def _layers(k):
    return [
        k.layers.Conv2D(16, 3, padding="same", activation="relu"),
        k.layers.Conv2D(32, 3, padding="same", activation="relu"),
        k.layers.MaxPooling2D(),
        k.layers.Flatten(),
        k.layers.Dense(64, activation="relu"),
        k.layers.Dense(10),
    ]


def _build(k):
    inp = k.Input((8, 8, 1), name="image")
    out = inp
    for layer in _layers(k):
        out = layer(out)
    return k.Model(inp, out)


def _train(k, x_train, y_train):
    k.utils.set_random_seed(0)
    model = _build(k)
    model.compile(
        optimizer=k.optimizers.Adam(3e-3),
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0)
    return model


def _accuracy(run, x, y, batch=128) -> float:
    preds = np.concatenate([run([x[i : i + batch]])[0] for i in range(0, len(x), batch)])
    return float((preds.argmax(-1) == y).mean())


@pytest.fixture(scope="module")
def keras3_setup(digits, tmp_path_factory):
    import keras

    x_train, x_test, y_train, y_test = digits
    model = _train(keras, x_train, y_train)
    workdir = str(tmp_path_factory.mktemp("ort_keras3"))
    source = to_saved_model(model, workdir)
    assert source.keras_flavor == "keras3"
    backend = OnnxRuntimeBackend()
    prepared = backend.prepare(source, workdir)
    fp32_keras = float((np.asarray(model(x_test, training=False)).argmax(-1) == y_test).mean())
    return backend, prepared, source, fp32_keras, model


def _fp32(prepared, backend):
    return OrtCandidate(
        prepared.fp32_path, prepared.input_names, prepared.output_names, "fp32", backend.session_options()
    )


def test_registered_and_precisions():
    assert registered()["onnxruntime"] is OnnxRuntimeBackend
    assert OnnxRuntimeBackend.precisions["int8"] == ("static", "dynamic")
    assert "bf16" not in OnnxRuntimeBackend.precisions


def test_prepare_keeps_names_and_matches_keras(keras3_setup, digits):
    backend, prepared, source, fp32_keras, model = keras3_setup
    _, x_test, _, y_test = digits
    assert prepared.input_names == source.input_names
    assert prepared.output_names == source.output_names
    assert prepared.preprocessed == "full"
    fp32 = _fp32(prepared, backend)
    out = fp32.run([x_test[:16]])
    assert len(out) == 1 and out[0].shape == (16, 10)
    np.testing.assert_allclose(out[0], np.asarray(model(x_test[:16], training=False)), rtol=1e-4, atol=1e-4)
    assert _accuracy(fp32.run, x_test, y_test) == pytest.approx(fp32_keras)


def test_search_space_defaults(keras3_setup):
    backend, prepared, *_ = keras3_setup
    space = backend.search_space(prepared, "int8", "static")
    default = dict(space.default().knobs)
    assert default["format"] == "QDQ"
    assert default["activation_type"] == "uint8"
    assert default["calibrate_method"] == "MinMax"
    assert set(space.knobs["calibrate_method"]) == {"MinMax", "Entropy", "Percentile"}
    # x86 without VNNI: 7-bit weights first (VPMADDUBSW saturation); otherwise no such knob.
    assert default.get("reduce_range", False) is (cpu_has_vnni() is False)
    # the default strategy then measures whether 8-bit weights saturate, before clipped ranges
    assert list(space.refinements) == ([{"reduce_range": False}] if cpu_has_vnni() is False else []) + [
        {"calibrate_method": "Percentile"}]
    # 2 Conv + 2 dense (MatMul or Gemm) nodes; the first and last weighted node lead the list.
    assert len(space.fallback_candidates) == 4
    weighted = prepared.quantizable(("Conv", "MatMul", "Gemm"))
    assert list(space.fallback_candidates[:2]) == [weighted[0], weighted[-1]]
    for values in space.knobs.values():  # JSON-friendly (smooth_quant: None = off, or an alpha)
        assert all(v is None or isinstance(v, (str, bool, float)) for v in values)
    assert space.knobs["smooth_quant"][0] is None  # SmoothQuant is off by default


def test_static_int8_default_accuracy(keras3_setup, digits):
    backend, prepared, _, fp32_keras, _ = keras3_setup
    x_train, x_test, _, y_test = digits
    config = backend.search_space(prepared, "int8", "static").default()
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_train[:N_CALIB]))
    assert cand.backend == "onnxruntime" and cand.precision == "int8"
    assert os.path.dirname(os.path.dirname(cand.model_path)) == prepared.trials_dir
    int8 = _accuracy(cand.run, x_test, y_test)
    assert fp32_keras > 0.9
    assert int8 >= fp32_keras * 0.99, (int8, fp32_keras)
    ops = {n.op_type for n in _onnx(cand.model_path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert cand.size_bytes() < os.path.getsize(prepared.model_path)


def _onnx(path):
    import onnx

    return onnx.load(path)


def test_save_load_round_trip(keras3_setup, digits, tmp_path):
    backend, prepared, source, *_ = keras3_setup
    x_train, x_test, *_ = digits
    config = backend.search_space(prepared, "int8", "static").default()
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_train[:N_CALIB]))
    cand.save(str(tmp_path))
    assert os.listdir(tmp_path) == [MODEL_FILE]
    manifest = {
        "backend": "onnxruntime",
        "precision": "int8",
        "inputs": [t.to_dict() for t in source.inputs],
        "outputs": [t.to_dict() for t in source.outputs],
        "config": config.to_dict(),
    }
    loaded = OnnxRuntimeBackend(BackendOptions(thread_num=1)).load(str(tmp_path), manifest)
    assert pickle.loads(pickle.dumps(loaded)).session.get_session_options().intra_op_num_threads == 1
    assert loaded.precision == "int8" and loaded.config == config
    assert loaded.session.get_session_options().intra_op_num_threads == 1
    a, b = cand.run([x_test[:64]]), loaded.run([x_test[:64]])
    np.testing.assert_array_equal(a[0], b[0])
    assert loaded.size_bytes(str(tmp_path)) == os.path.getsize(tmp_path / MODEL_FILE)
    # A pickled candidate carries its model bytes and rebuilds its session.
    clone = pickle.loads(pickle.dumps(cand))
    np.testing.assert_array_equal(clone.run([x_test[:8]])[0], a[0][:8])


def test_fallback_one_node(keras3_setup, digits):
    backend, prepared, *_ = keras3_setup
    x_train, x_test, _, y_test = digits
    space = backend.search_space(prepared, "int8", "static")
    node = space.fallback_candidates[0]
    config = TrialConfig.make(dict(space.default().knobs), fallback=[node])
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_train[:N_CALIB]))
    graph = _onnx(cand.model_path).graph
    kept = [n for n in graph.node if n.name == node]
    assert len(kept) == 1 and kept[0].op_type == "Conv"
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(kept[0].input[1]) != "DequantizeLinear"  # FP32 weight, not a DQ'd one
    assert _accuracy(cand.run, x_test, y_test) > 0.9
    with pytest.raises(ValueError, match="fallback"):
        backend.quantize(prepared, "int8", TrialConfig.make(fallback=["no_such_node"]),
                         DigitsCalibration(x_train[:N_CALIB]))


def test_histogram_calibration_takes_a_short_last_batch(keras3_setup, digits):
    # 45 rows in batches of 20: 20, 20, 5. ORT's histogram calibrators stack each tensor over
    # all batches and failed on the short one ("inhomogeneous shape"); it is padded with its rows.
    backend, prepared, *_ = keras3_setup
    x_train, x_test, _, y_test = digits
    space = backend.search_space(prepared, "int8", "static")
    config = TrialConfig.make({**dict(space.default().knobs), "calibrate_method": "Percentile"})
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_train[:45], batch_size=20))
    assert _accuracy(cand.run, x_test, y_test) > 0.9
    from nano_tfx.backends.onnxruntime.quantize import _uniform_batches

    a = np.arange(5.0)[:, None]
    padded = _uniform_batches([{"x": np.zeros((3, 1))}, {"x": a[:2]}])
    assert [b["x"][:, 0].tolist() for b in padded] == [[0, 0, 0], [0.0, 1.0, 0.0]]


def test_dynamic_int8(keras3_setup, digits):
    backend, prepared, _, fp32_keras, _ = keras3_setup
    _, x_test, _, y_test = digits
    space = backend.search_space(prepared, "int8", "dynamic")
    assert "format" not in space.knobs and "calibrate_method" not in space.knobs
    cand = backend.quantize(prepared, "int8", space.default(), None)
    ops = {n.op_type for n in _onnx(cand.model_path).graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops  # default: Conv stays FP32
    assert _accuracy(cand.run, x_test, y_test) >= fp32_keras * 0.98


def test_fp16(keras3_setup, digits):
    backend, prepared, _, fp32_keras, _ = keras3_setup
    _, x_test, _, y_test = digits
    cand = backend.quantize(prepared, "fp16", backend.search_space(prepared, "fp16", "static").default(), None)
    import onnx

    weights = [i for i in _onnx(cand.model_path).graph.initializer if i.dims and len(i.dims) > 1]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    out = cand.run([x_test[:4]])[0]
    assert out.dtype == np.float32  # IO kept fp32
    assert _accuracy(cand.run, x_test, y_test) >= fp32_keras * 0.99


def test_method_qlinear_pins_qoperator(keras3_setup, digits):
    _, prepared, *_ = keras3_setup
    x_train = digits[0]
    backend = OnnxRuntimeBackend(BackendOptions(method="qlinear"))
    space = backend.search_space(prepared, "int8", "static")
    assert space.knobs["format"] == ["QOperator"]
    cand = backend.quantize(prepared, "int8", space.default(), DigitsCalibration(x_train[:N_CALIB]))
    assert "QLinearConv" in {n.op_type for n in _onnx(cand.model_path).graph.node}


def test_bad_requests_raise_value_error(keras3_setup):
    backend, prepared, *_ = keras3_setup
    with pytest.raises(ValueError, match="precision"):
        backend.validate("bf16", "static")
    with pytest.raises(ValueError, match="precision"):
        backend.search_space(prepared, "bf16", "static")
    with pytest.raises(ValueError, match="approach"):
        backend.validate("int8", "qat")
    with pytest.raises(ValueError, match="method.*approach='dynamic'"):
        OnnxRuntimeBackend(BackendOptions(method="integer")).validate("int8", "static")
    with pytest.raises(ValueError, match="method.*approach='static'"):
        OnnxRuntimeBackend(BackendOptions(method="qlinear")).validate("int8", "dynamic")
    with pytest.raises(ValueError, match="method"):
        OnnxRuntimeBackend(BackendOptions(method="fx")).validate("int8", "static")
    with pytest.raises(ValueError, match="calibrate_method"):
        backend.quantize(prepared, "int8", TrialConfig.make({"calibrate_method": "KL"}), [])
    with pytest.raises(ValueError, match=r"config: knobs \['weight_type'\]"):
        backend.quantize(prepared, "int8", TrialConfig.make({"approach": "static", "weight_type": "int8"}), [])
    with pytest.raises(ValueError, match="calibration"):
        backend.quantize(prepared, "int8", TrialConfig.make({"approach": "static"}), None)
    with pytest.raises(ValueError, match="thread_num"):
        OnnxRuntimeBackend(BackendOptions(thread_num=0)).session_options()
    OnnxRuntimeBackend(BackendOptions(method="integer")).validate("int8", "dynamic")


def test_tf_keras_variant(keras3_setup, digits, tmp_path):
    """Same architecture in tf_keras with the Keras 3 weights copied in (training under tf_keras
    costs ~20 s of autograph tracing on 2 cores; the export/convert path is what is tested)."""
    import tf_keras

    x_train, x_test, _, y_test = digits
    model = _build(tf_keras)
    model.set_weights(keras3_setup[4].get_weights())
    source = to_saved_model(model, str(tmp_path))
    assert source.keras_flavor == "tf_keras"
    backend = OnnxRuntimeBackend()
    prepared = backend.prepare(source, str(tmp_path))
    assert prepared.input_names == source.input_names
    fp32 = _accuracy(_fp32(prepared, backend).run, x_test, y_test)
    ref = float((np.asarray(model(x_test, training=False)).argmax(-1) == y_test).mean())
    assert fp32 == pytest.approx(ref) and fp32 > 0.9
    config = backend.search_space(prepared, "int8", "static").default()
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_train[:N_CALIB]))
    assert _accuracy(cand.run, x_test, y_test) >= fp32 * 0.99


@pytest.mark.parametrize("weight_type,per_channel", [("int8", False), ("uint8", True)])
def test_dynamic_int8_with_conv(keras3_setup, digits, weight_type, per_channel):
    backend, prepared, _, fp32_keras, _ = keras3_setup
    _, x_test, _, y_test = digits
    space = backend.search_space(prepared, "int8", "dynamic")
    assert space.knobs["quantize_conv"] == [False, True]
    knobs = dict(space.default().knobs, quantize_conv=True, weight_type=weight_type, per_channel=per_channel)
    cand = backend.quantize(prepared, "int8", TrialConfig.make(knobs), None)
    ops = [n.op_type for n in _onnx(cand.model_path).graph.node]
    assert ops.count("ConvInteger") == 2 and "MatMulInteger" in ops
    assert _accuracy(cand.run, x_test, y_test) >= fp32_keras * 0.98


def test_trial_files_removed_with_candidate(keras3_setup):
    backend, prepared, *_ = keras3_setup
    cand = backend.quantize(prepared, "int8", backend.search_space(prepared, "int8", "dynamic").default(), None)
    trial_dir = os.path.dirname(cand.model_path)
    assert os.path.isfile(cand.model_path)
    del cand
    gc.collect()
    assert not os.path.exists(trial_dir)


def test_multi_input_multi_output_names(tmp_path):
    """Inputs/outputs whose declaration order differs from their sorted order keep their names."""
    import keras

    a, b = keras.Input((4,), name="zeta"), keras.Input((3,), name="alpha")
    h = keras.layers.Concatenate()([keras.layers.Dense(5)(a), keras.layers.Dense(2)(b)])
    model = keras.Model([a, b], [keras.layers.Dense(3, name="zz_out")(h), keras.layers.Dense(1, name="aa_out")(h)])
    source = to_saved_model(model, str(tmp_path))
    backend = OnnxRuntimeBackend()
    prepared = backend.prepare(source, str(tmp_path))
    assert prepared.input_names == ["zeta", "alpha"] and prepared.output_names == ["zz_out", "aa_out"]
    assert prepared.preprocessed in ("full", "full_auto_merge")
    rng = np.random.default_rng(0)
    xa, xb = rng.random((64, 4), dtype=np.float32), rng.random((64, 3), dtype=np.float32)
    ref = [np.asarray(t) for t in model([xa, xb], training=False)]
    got = _fp32(prepared, backend).run([xa, xb])
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    calib = [[xa[i : i + 16], xb[i : i + 16]] for i in range(0, 64, 16)]
    cand = backend.quantize(prepared, "int8", backend.search_space(prepared, "int8", "static").default(), calib)
    q = cand.run([xa, xb])
    assert [o.shape for o in q] == [(64, 3), (64, 1)]
    assert np.abs(q[0] - ref[0]).max() < 0.1 * np.abs(ref[0]).max()


def test_static_int8_keeps_a_wide_softmax_output(tmp_path):
    """A 1000-way softmax whose probabilities are all small (a random-weight classifier head,
    ~0.001 each): ORT pins a quantized Softmax's output to [0, 1] in uint8 steps, which turned every
    probability into 0. Static INT8 keeps Softmax in FP32, so the output stays near FP32."""
    import keras
    import onnx

    keras.utils.set_random_seed(0)
    inp = keras.Input((32,), name="features")
    hidden = keras.layers.Dense(64, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(1000, activation="softmax", name="probs")(hidden))
    source = to_saved_model(model, str(tmp_path))
    backend = OnnxRuntimeBackend()
    prepared = backend.prepare(source, str(tmp_path))
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    ref = np.asarray(model(x, training=False))
    assert ref.max() < 0.01  # every probability small: the case a [0, 1] uint8 range zeroes
    cand = backend.quantize(prepared, "int8", backend.search_space(prepared, "int8", "static").default(),
                            [[x[i:i + 16]] for i in range(0, 64, 16)])
    got = cand.run([x])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
    graph = onnx.load(cand.model_path).graph
    assert any(n.op_type in ("MatMul", "QLinearMatMul") for n in graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= 2  # the Dense layers are INT8


def test_missed_bar_best_model_outlives_the_call(tmp_path):
    """``AccuracyCriterionNotMet.best_model`` of a call with its own temp workdir saves and loads:
    the failed call used to remove that workdir on the way out, deleting the best trial's
    model.onnx (the first of two here: the second scores lower) before ``save()``."""
    import tf_keras

    import nano_tfx

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(16, activation="relu"),
                                 tf_keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    scores = iter([1.0, 0.8, 0.7])  # FP32 first, then each trial worse
    with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as info:
        nano_tfx.quantize(model, accelerator="onnxruntime", calib_dataset=x, eval_func=lambda m: next(scores),
                          accuracy_criterion={"relative": 0.01}, max_trials=2)
    best = info.value.best_model
    assert [t.metric for t in info.value.report.trials] == [0.8, 0.7]
    best.save(str(tmp_path / "m"))
    loaded = nano_tfx.load(str(tmp_path / "m"))
    np.testing.assert_allclose(loaded.predict(x), best.predict(x), rtol=1e-5, atol=1e-5)


def test_diagnose_a_qlinear_model():
    """method='qlinear' pins QOperator for the returned model; its per-layer diagnosis measures the
    same config in QDQ form (it raised "method='qlinear' pins 'QOperator'" before)."""
    import keras

    import nano_tfx

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
    q = nano_tfx.quantize(model, accelerator="onnxruntime", method="qlinear", calib_dataset=x)
    rows = q.diagnose(x)
    assert len(rows) == 2 and {r["op"] for r in rows} == {"Conv", "MatMul"}
