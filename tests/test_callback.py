"""QuantizationCallback on real fits (Keras 3 and tf_keras), real INC quantization."""
import numpy as np
import pytest

import nano_tfx
from conftest import build_cnn
from nano_tfx.keras.callbacks import QuantizationCallback


def _fit(keras_module, digits, callback, epochs=4):
    (xtr, ytr), (xte, yte) = digits
    inp, out = build_cnn(keras_module, seed=1)
    model = keras_module.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(xtr[:600], ytr[:600], epochs=epochs, batch_size=64, verbose=0, callbacks=[callback])
    return model, history


@pytest.mark.parametrize("flavor", ["keras3", "tf_keras"])
def test_every_two_epochs_logs_keeps_best_and_saves(flavor, digits, tmp_path):
    import importlib

    keras_module = importlib.import_module("keras" if flavor == "keras3" else "tf_keras")
    _, (xte, yte) = digits
    cb = QuantizationCallback(
        calib_dataset=xte[:100], validation_data=(xte, yte), metric=keras_module.metrics.SparseCategoricalAccuracy(),
        accuracy_criterion={"relative": 0.05, "higher_is_better": True}, every_n_epochs=2,
        save_path=str(tmp_path / "best"), save_best_only=True, max_trials=2,
    )
    model, history = _fit(keras_module, digits, cb)
    logs = history.history
    name = "int8_sparse_categorical_accuracy"
    assert name in logs and "int8_latency_ms" in logs and "int8_criterion_met" in logs
    # Logged at epochs 2 and 4 only: History fills only the epochs that carried the key.
    assert len(cb.history) == 2 and [h["epoch"] for h in cb.history] == [2, 4]
    values = [h[name] for h in cb.history]
    assert all(0.0 <= v <= 1.0 for v in values) and all(h["int8_latency_ms"] > 0 for h in cb.history)
    assert "int8_speedup" in logs and all(h["int8_speedup"] > 0 for h in cb.history)
    rep = cb.quantized_model.report  # the kept (best) model's report: FP32 and INT8 side by side
    kept = next(h for h in cb.history if h["epoch"] == cb.best_epoch)
    assert rep.fp32_latency_ms > 0 and rep.speedup == pytest.approx(kept["int8_speedup"])
    # next to it, the gain over the same engine's FP32 (timed in the same run)
    assert "int8_gain" in logs and all(h["int8_gain"] > 0 for h in cb.history)
    assert rep.int8_gain == pytest.approx(kept["int8_gain"])
    best = max(range(2), key=lambda i: values[i])
    assert cb.best_epoch == cb.history[best]["epoch"] and cb.best_value == pytest.approx(values[best])
    loaded = nano_tfx.load(tmp_path / "best")
    np.testing.assert_allclose(loaded.predict(xte), cb.quantized_model.predict(xte), atol=1e-6)
    assert abs(float((loaded.predict(xte).argmax(-1) == yte).mean()) - cb.best_value) < 1e-6


def test_default_quantizes_once_at_the_end(digits):
    import keras

    _, (xte, yte) = digits
    cb = QuantizationCallback(calib_dataset=(xte[:200], yte[:200]))
    _, history = _fit(keras, digits, cb, epochs=2)
    assert [h["epoch"] for h in cb.history] == [2]
    assert "int8_accuracy" in cb.history[0] and "int8_loss" in cb.history[0]  # compiled metrics
    assert cb.quantized_model is not None and cb.quantized_model.precision == "int8"


@pytest.mark.parametrize("kwargs, match", [
    (dict(calib_dataset=None), "calib_dataset"),
    (dict(calib_dataset=np.zeros((4, 8, 8, 1)), metric="accuracy"), "labelled"),
    (dict(calib_dataset=np.zeros((4, 8, 8, 1)), every_n_epochs=0), "every_n_epochs"),
    (dict(calib_dataset=np.zeros((4, 8, 8, 1)), accuracy_criterion={"relative": 0.01}), "accuracy_criterion"),
    (dict(calib_dataset=np.zeros((4, 8, 8, 1)), accelerator="tpu"), "accelerator"),
    (dict(calib_dataset=np.zeros((4, 8, 8, 1)), bogus=1), "bogus"),
])
def test_bad_input_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationCallback(**kwargs)


def test_precision_auto_in_the_callback_says_what_it_kept(digits):
    """The ladder through the callback: the kept model's precision is in its history entry."""
    import keras

    _, (xte, yte) = digits
    cb = QuantizationCallback(calib_dataset=(xte[:200], yte[:200]), metric="accuracy", precision="auto",
                              accelerator="onnxruntime", max_trials=3, verbose=0)
    _fit(keras, digits, cb, epochs=1)
    (entry,) = cb.history
    assert entry["precision"] == cb.quantized_model.precision in ("int8", "fp32")  # no BF16 on ONNX Runtime
    assert {r["rung"] for r in cb.quantized_model.report.ladder} == {"int8", "int8+bf16", "bf16", "fp32"}
