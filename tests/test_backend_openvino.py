"""OpenVINO backend against real OpenVINO + NNCF (no mocks): small CNNs on sklearn digits."""
from __future__ import annotations

import os
import pickle

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from nano_tfx.backends.base import (  # noqa: E402
    SMOOTH_QUANT,
    AccuracyContext,
    BackendOptions,
    CalibrationData,
    TrialConfig,
    backend_class,
    cpu_has_vnni,
)
from nano_tfx.backends.openvino import OpenVINOBackend, OpenVINOCandidate, cpu_capabilities  # noqa: E402
from nano_tfx.interchange import to_saved_model  # noqa: E402

EPOCHS = 4


class DigitsCalibration(CalibrationData):
    """Re-iterable batches of the first ``n`` training images (inputs only)."""

    def __init__(self, x: np.ndarray, n: int = 100, batch_size: int = 10):
        self.x = x[:n]
        self.batch_size = batch_size
        self.num_samples = n

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            yield [self.x[i : i + self.batch_size]]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=400, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def _batches(x, y, size=100):
    return [([x[i : i + size]], y[i : i + size]) for i in range(0, len(x), size)]


def accuracy(run_fn, x, y) -> float:
    hits = sum(int((run_fn(xs)[0].argmax(-1) == ys).sum()) for xs, ys in _batches(x, y))
    return hits / len(y)


def nll(run_fn, x, y) -> float:
    total = 0.0
    for xs, ys in _batches(x, y):
        p = run_fn(xs)[0]
        total += float(-np.log(np.clip(p[np.arange(len(ys)), ys], 1e-12, 1.0)).sum())
    return total / len(y)


@pytest.fixture(scope="module")
def keras3_model(digits):
    import keras

    x_tr, y_tr, _, _ = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_tr, y_tr, epochs=EPOCHS, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def k3(keras3_model, digits, tmp_path_factory):
    """(backend, prepared, fp32 reference candidate, fp32 held-out accuracy) for the Keras 3 CNN."""
    work = str(tmp_path_factory.mktemp("ov_k3"))
    source = to_saved_model(keras3_model, work)
    assert source.keras_flavor == "keras3"
    backend = OpenVINOBackend()
    prepared = backend.prepare(source, work)
    ref = backend.reference(prepared)
    _, _, x_te, y_te = digits
    return backend, prepared, ref, accuracy(ref.run, x_te, y_te)


@pytest.fixture(scope="module")
def k3_int8(k3, digits):
    backend, prepared, _, _ = k3
    space = backend.search_space(prepared, "int8", "static")
    return backend.quantize(prepared, "int8", space.default(), DigitsCalibration(digits[0]))


def test_registry_and_precisions():
    assert backend_class("openvino") is OpenVINOBackend
    precisions = OpenVINOBackend.precisions  # readable on the class, as the api does
    assert precisions["int8"] == ("static",)
    assert "fp16" in precisions
    assert ("bf16" in precisions) == ("BF16" in cpu_capabilities())


def test_prepare_matches_keras_and_source(k3, keras3_model, digits):
    backend, prepared, ref, acc = k3
    src = prepared.source
    model = prepared.model()
    assert [sorted(p.get_names()) for p in model.inputs] == [[n] for n in src.input_names]
    assert [sorted(p.get_names()) for p in model.outputs] == [[n] for n in src.output_names]
    assert model.inputs[0].get_partial_shape()[0].is_dynamic
    assert ref.precision == "fp32" and ref.backend == "openvino"
    assert ref.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    x = digits[2][:7]  # any batch size
    np.testing.assert_allclose(ref.run([x])[0], np.asarray(keras3_model(x, training=False)), atol=1e-5)
    assert ref.run([x[:1]])[0].shape == (1, 10)
    assert acc > 0.85
    # Stable names: OpenVINO's auto names ('Convolution_28') come from a process-global counter;
    # a second conversion in the same process must still give the same fallback names.
    assert len(prepared.quantizable) == 4
    again = backend.prepare(src, os.path.dirname(os.path.dirname(prepared.ir_path)) + "/again")
    assert again.quantizable == prepared.quantizable and again.fallback_candidates == prepared.fallback_candidates
    assert set(prepared.fallback_candidates) == set(prepared.quantizable)
    assert pickle.loads(pickle.dumps(prepared)).ir_path == prepared.ir_path  # Beam-safe


def test_search_space(k3):
    backend, prepared, _, _ = k3
    space = backend.search_space(prepared, "int8", "static")
    default = dict(space.default().knobs)
    # SmoothQuant is a knob of models with a MatMul (this CNN's Dense), off by default
    assert SMOOTH_QUANT in default and default.pop(SMOOTH_QUANT) is None
    no_vnni = cpu_has_vnni() is False
    assert default == {"accuracy_control": True, "preset": "performance", "fast_bias_correction": True,
                       "subset_size": 300, "activation_range": "auto", **({"overflow_fix": "auto"} if no_vnni else {})}
    # what the default strategy tries once fallback paid off: exact ranges, then 8-bit weights here
    assert list(space.refinements) == [{"activation_range": "minmax"}] + ([{"overflow_fix": "first_layer"}] if no_vnni else [])
    assert list(space.fallback_candidates) == list(prepared.fallback_candidates)
    assert backend.search_space(prepared, "fp16", "static").knobs == {}


def test_int8_default_accuracy(k3, k3_int8, digits):
    _, _, _, fp32_acc = k3
    cand = k3_int8
    assert isinstance(cand, OpenVINOCandidate)
    assert (cand.backend, cand.precision) == ("openvino", "int8")
    assert cand.details["fake_quantize"] > 0 and cand.details["quantized_weights"] == 4
    assert cand.details["calibration_batches"] == 10  # 100 samples / batch 10
    assert cand.details["activation_range"] == "mean_minmax"  # NNCF's default: 10 images per item
    # 7-bit weights everywhere only where the CPU lacks VNNI (NNCF's default: the first layer)
    assert cand.details["overflow_fix"] == ("enable" if cpu_has_vnni() is False else "first_layer_only")
    int8_acc = accuracy(cand.run, digits[2], digits[3])
    assert int8_acc >= fp32_acc * 0.99, (int8_acc, fp32_acc)


def test_save_load_roundtrip(k3, k3_int8, digits, tmp_path):
    backend, prepared, ref, _ = k3
    cand = k3_int8
    out = tmp_path / "int8"
    out.mkdir()
    cand.save(str(out))
    assert sorted(os.listdir(out)) == ["model.bin", "model.xml"]
    src = prepared.source
    manifest = {
        "backend": "openvino",
        "precision": "int8",
        "inputs": [t.to_dict() for t in src.inputs],
        "outputs": [t.to_dict() for t in src.outputs],
        "config": TrialConfig.make().to_dict(),
    }
    loaded = OpenVINOBackend().load(str(out), manifest)
    assert loaded.precision == "int8"
    x = digits[2][:50]
    np.testing.assert_array_equal(loaded.run([x])[0], cand.run([x])[0])
    assert cand.size_bytes(str(out)) == cand.size_bytes() > 0
    assert cand.size_bytes() < ref.size_bytes()


def test_fallback_ignored_scope(k3, k3_int8, digits):
    backend, prepared, _, fp32_acc = k3
    keep = prepared.quantizable[0]  # first conv stays FP32
    cand = backend.quantize(prepared, "int8", TrialConfig.make({}, [keep]), DigitsCalibration(digits[0]))
    assert cand.details["quantized_weights"] == len(prepared.quantizable) - 1
    assert cand.details["fake_quantize"] < k3_int8.details["fake_quantize"]
    op = next(o for o in cand.model.get_ordered_ops() if o.get_friendly_name() == keep)
    weight = op.input_value(1).get_node()
    assert weight.get_type_name() == "Constant" and weight.get_element_type() == ov.Type.f32
    assert accuracy(cand.run, digits[2], digits[3]) >= fp32_acc * 0.99
    with pytest.raises(ValueError, match="fallback"):
        backend.quantize(prepared, "int8", TrialConfig.make({}, ["no/such/op"]), DigitsCalibration(digits[0]))


def test_accuracy_control_metric(k3, digits):
    """Higher-is-better metric with labelled eval batches: NNCF's drop bound holds."""
    backend, prepared, _, fp32_acc = k3
    _, _, x_te, y_te = digits
    ctx = AccuracyContext(
        evaluate=lambda run_fn: accuracy(run_fn, x_te, y_te),
        baseline=fp32_acc,
        max_drop=0.005,
        drop_type="relative",
        higher_is_better=True,
        eval_batches=lambda: iter(_batches(x_te, y_te)),
    )
    space = backend.search_space(prepared, "int8", "static")
    cand = backend.quantize(prepared, "int8", space.default(), DigitsCalibration(digits[0]), ctx)
    assert cand.details["accuracy_control"] is True
    assert accuracy(cand.run, x_te, y_te) >= fp32_acc * (1 - 0.005)


def test_accuracy_control_lower_is_better(k3, k3_int8, digits):
    """A loss (lower is better) with a bound INT8 cannot meet: NNCF must see the quantized model
    as worse (we negate) and revert quantizers; without eval_batches it ranks on calibration data."""
    backend, prepared, ref, _ = k3
    _, _, x_te, y_te = digits
    base = nll(ref.run, x_te, y_te)
    calls = []

    def evaluate(run_fn):
        calls.append(1)
        return nll(run_fn, x_te, y_te)

    ctx = AccuracyContext(evaluate=evaluate, baseline=base, max_drop=1e-7, drop_type="absolute",
                          higher_is_better=False, eval_batches=None)
    assert nll(k3_int8.run, x_te, y_te) > base + 1e-7  # the plain INT8 model misses the bound
    cand = backend.quantize(prepared, "int8", TrialConfig.make({"accuracy_control": True}),
                            DigitsCalibration(digits[0]), ctx)
    assert len(calls) >= 3  # initial, quantized, then restorer iterations
    assert cand.details["fake_quantize"] < k3_int8.details["fake_quantize"]
    assert nll(cand.run, x_te, y_te) < nll(k3_int8.run, x_te, y_te)
    # The knob turns it off even with a context.
    plain = backend.quantize(prepared, "int8", TrialConfig.make({"accuracy_control": False}),
                             DigitsCalibration(digits[0]), ctx)
    assert plain.details["accuracy_control"] is False


def test_tf_keras_model(keras3_model, digits, tmp_path):
    """A model built with tf_keras (imported directly). Training tf_keras again would cost ~20 s
    of CPU, so it gets the trained Keras 3 weights (same layers, same kernel layouts)."""
    import tf_keras

    x_tr, _, x_te, y_te = digits
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Conv2D(16, 3, activation="relu", padding="same", input_shape=(8, 8, 1)),
            tf_keras.layers.Conv2D(32, 3, activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(64, activation="relu"),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.set_weights(keras3_model.get_weights())
    source = to_saved_model(model, str(tmp_path))
    assert source.keras_flavor == "tf_keras"
    backend = OpenVINOBackend(BackendOptions(thread_num=1))
    prepared = backend.prepare(source, str(tmp_path))
    ref = backend.reference(prepared)
    np.testing.assert_allclose(ref.run([x_te[:5]])[0], model(x_te[:5], training=False).numpy(), atol=1e-5)
    fp32_acc = accuracy(ref.run, x_te, y_te)
    assert fp32_acc > 0.85
    config = TrialConfig.make({"preset": "mixed", "fast_bias_correction": False, "subset_size": 300})
    cand = backend.quantize(prepared, "int8", config, DigitsCalibration(x_tr, n=64, batch_size=8))
    assert cand.details["calibration_batches"] == 8
    assert cand.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert accuracy(cand.run, x_te, y_te) >= fp32_acc * 0.99


def test_bf16(k3, digits):
    backend, prepared, _, fp32_acc = k3
    if "BF16" not in cpu_capabilities():
        # No native BF16 (no AVX512_BF16/AMX): OpenVINO would silently run f32, so it is refused.
        with pytest.raises(ValueError, match="precision"):
            backend.validate("bf16", "static")
        with pytest.raises(ValueError, match="precision"):
            backend.quantize(prepared, "bf16", TrialConfig.make(), None)
        return
    cand = backend.quantize(prepared, "bf16", TrialConfig.make(), None)
    assert cand.precision == "bf16"
    assert cand.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert accuracy(cand.run, digits[2], digits[3]) >= fp32_acc - 0.02


def test_fp16_compressed_ir(k3, digits, tmp_path):
    backend, prepared, ref, fp32_acc = k3
    cand = backend.quantize(prepared, "fp16", TrialConfig.make(), None)
    assert cand.precision == "fp16"
    x = digits[2][:20]
    np.testing.assert_allclose(cand.run([x])[0], ref.run([x])[0], atol=2e-3)
    cand.save(str(tmp_path))
    assert cand.size_bytes(str(tmp_path)) < 0.6 * ref.size_bytes()
    loaded = backend.load(str(tmp_path), {"backend": "openvino", "precision": "fp16",
                                          "inputs": [t.to_dict() for t in prepared.source.inputs],
                                          "outputs": [t.to_dict() for t in prepared.source.outputs]})
    np.testing.assert_array_equal(loaded.run([x])[0], cand.run([x])[0])


def test_unsupported_precision_and_approach(k3):
    backend, prepared, _, _ = k3
    with pytest.raises(ValueError, match="precision"):
        backend.validate("int4", "static")
    with pytest.raises(ValueError, match="approach"):
        backend.validate("int8", "dynamic")
    with pytest.raises(ValueError, match="precision"):
        backend.search_space(prepared, "int4", "static")
    with pytest.raises(ValueError, match="calibration"):
        backend.quantize(prepared, "int8", TrialConfig.make(), None)
    with pytest.raises(ValueError, match="activation_range"):
        backend.quantize(prepared, "int8", TrialConfig.make({"activation_range": "p99"}), DigitsCalibration(np.zeros((10, 8, 8, 1), np.float32)))
    with pytest.raises(ValueError, match="overflow_fix: expected one of"):
        backend.quantize(prepared, "int8", TrialConfig.make({"overflow_fix": "on"}), DigitsCalibration(np.zeros((10, 8, 8, 1), np.float32)))


def _mlp(features: int, hidden: int):
    """(batch, features) -> MatMul(features x hidden) -> ReLU -> MatMul(hidden x 3), an ov.Model."""
    import openvino.runtime.opset13 as ops

    x = ops.parameter([-1, features], np.float32, name="x")
    h = ops.relu(ops.matmul(x, ops.constant(np.ones((features, hidden), np.float32)), False, False))
    return ov.Model([ops.matmul(h, ops.constant(np.ones((hidden, 3), np.float32)), False, False)], [x])


def test_activation_range_global_for_few_values_per_item():
    """NNCF's default per-tensor range (mean over items of each item's min/max) degenerates when
    an item holds few values: the penguin MLP's scalar features calibrated one sample per item
    were clipped at ~1 sd and flipped an eval class. Few values -> global min/max."""
    from nano_tfx.backends.openvino.backend import _activation_range

    assert _activation_range(_mlp(4, 16), batch=1) == "minmax"  # penguin: 4 features, batch 1
    assert _activation_range(_mlp(4, 16), batch=4) == "minmax"  # 16 feature values per item
    assert _activation_range(_mlp(4, 16), batch=8) == "mean_minmax"  # 32
    assert _activation_range(_mlp(64, 128), batch=1) == "mean_minmax"  # digits-sized inputs


def test_options_reach_compile(k3):
    _, prepared, _, _ = k3
    backend = OpenVINOBackend(BackendOptions(thread_num=1, openvino_config={"PERFORMANCE_HINT": "THROUGHPUT"}))
    cand = backend.reference(pickle.loads(pickle.dumps(prepared)))
    assert cand.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(cand.compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")


def test_multi_io_order(tmp_path):
    """Inputs/outputs follow the source order, whatever order OpenVINO converted them in."""
    import keras

    keras.utils.set_random_seed(1)
    a = keras.Input((4,), name="zeta")
    b = keras.Input((3,), name="alpha")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    # List outputs: dict outputs whose keys are not sorted hit an interchange naming bug
    # (export_keras zips insertion-order names with tf.nest's sorted-key tensors).
    model = keras.Model([a, b], [keras.layers.Dense(2, name="z_out")(h), keras.layers.Dense(5, name="a_out")(h)])
    source = to_saved_model(model, str(tmp_path))
    assert source.input_names == ["zeta", "alpha"]
    backend = OpenVINOBackend()
    prepared = backend.prepare(source, str(tmp_path))
    ref = backend.reference(prepared)
    rng = np.random.default_rng(0)
    xa, xb = rng.random((6, 4), dtype=np.float32), rng.random((6, 3), dtype=np.float32)
    want = model([xa, xb], training=False)
    got = ref.run([xa, xb])
    assert [a.shape[1] for a in got] == [t.shape[1] for t in source.outputs] == [2, 5]
    for arr, w in zip(got, want):
        np.testing.assert_allclose(arr, np.asarray(w), atol=1e-5)
    # float64 / non-contiguous inputs are converted, not rejected
    got64 = ref.run([np.asfortranarray(xa.astype(np.float64)), xb])
    np.testing.assert_allclose(got64[0], got[0], atol=1e-6)
