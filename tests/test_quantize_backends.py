"""Every backend through the public API on the trained digits CNN: accuracy, save/load, auto."""
import numpy as np
import pytest

import nano_tfx
from conftest import accuracy

CRITERION = {"relative": 0.01, "higher_is_better": True}


@pytest.mark.parametrize("accelerator", ["onnxruntime", "openvino"])
def test_backend_meets_one_percent_and_round_trips(accelerator, keras3_cnn, digits, tmp_path):
    _, (xte, yte) = digits
    fp32 = accuracy(keras3_cnn.predict(xte, verbose=0), yte)
    q = nano_tfx.quantize(keras3_cnn, accelerator=accelerator, calib_dataset=(xte, yte), metric="accuracy",
                          accuracy_criterion=CRITERION, batch=64, max_trials=5)
    assert q.backend == accelerator and q.precision == "int8" and q.report.met
    # the gain over this engine's own FP32, timed in the final side-by-side (no claim which is faster)
    assert q.report.int8_gain > 0 and q.report.engine_fp32_latency_ms > 0
    assert f"{accelerator} fp32" in q.report.side_by_side["b1_ms"]
    assert accuracy(q.predict(xte), yte) >= fp32 * 0.99
    assert tuple(q(xte[:3]).shape) == (3, 10)
    q.save(tmp_path / "m")
    loaded = nano_tfx.load(tmp_path / "m")
    assert loaded.backend == accelerator and loaded.precision == "int8"
    np.testing.assert_allclose(loaded.predict(xte), q.predict(xte), atol=1e-5)


@pytest.mark.parametrize("accelerator", ["onnxruntime", "openvino"])
def test_tf_keras_model_per_backend(accelerator, tf_keras_cnn, digits):
    _, (xte, yte) = digits
    fp32 = accuracy(tf_keras_cnn.predict(xte, verbose=0), yte)
    q = nano_tfx.quantize(tf_keras_cnn, accelerator=accelerator, calib_dataset=(xte, yte),
                          metric="accuracy", accuracy_criterion=CRITERION, batch=64, max_trials=5)
    assert accuracy(q.predict(xte), yte) >= fp32 * 0.99


def test_onnxruntime_dynamic_and_fp16(keras3_cnn, digits):
    _, (xte, yte) = digits
    fp32 = accuracy(keras3_cnn.predict(xte, verbose=0), yte)
    dyn = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", approach="dynamic", calib_dataset=xte[:64])
    assert accuracy(dyn.predict(xte), yte) >= fp32 - 0.05
    half = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", precision="fp16")
    assert half.precision == "fp16" and accuracy(half.predict(xte), yte) >= fp32 - 0.01


def test_auto_returns_the_fastest_meeting_result_with_a_full_table(keras3_cnn, digits):
    _, (xte, yte) = digits
    q = nano_tfx.quantize(keras3_cnn, accelerator="auto", calib_dataset=(xte, yte), metric="accuracy",
                          accuracy_criterion=CRITERION, batch=64, max_trials=3)
    report = q.report
    assert report.backend == "auto" and report.met
    tried = {(t.backend, t.precision) for t in report.trials}
    assert {("inc", "int8"), ("onnxruntime", "int8"), ("openvino", "int8")} <= tried
    chosen = report.chosen_trial
    assert chosen.passed and (chosen.backend, chosen.precision) == (q.backend, q.precision)
    meeting = [t for t in report.trials if t.passed and t.latency_ms is not None]
    assert all(t.latency_batch_ms is not None for t in meeting)
    # each backend's pick is re-timed side by side; the fastest of those wins
    finalists = report.selection_latency_ms
    assert len(finalists) >= 2 and all(report.trials[i].passed for i in finalists)
    assert report.chosen == min(finalists, key=finalists.get)
    assert nano_tfx.Report.from_dict(report.to_dict()).selection_latency_ms == finalists
    assert "| backend |" in report.table()


def test_auto_chooses_through_the_call_path_it_is_given(keras3_cnn, digits):
    """``call_path`` (how the deployed model is called, e.g. a server's parse + tf.Transform
    first) decides among finalists: here it adds 20 ms to every OpenVINO call, so OpenVINO —
    whatever its model-only time (a CNN of 28x28 digits: far below 20 ms on any CPU that runs the
    suite) — must lose, and the served times are reported."""
    import time

    _, (xte, yte) = digits
    wrapped = []

    def call_path(model):
        wrapped.append(model.backend)
        run = model.run

        def served(x):
            if model.backend == "openvino":
                time.sleep(0.02)
            return run(x)
        return served

    q = nano_tfx.quantize(keras3_cnn, accelerator="auto", calib_dataset=(xte, yte), metric="accuracy",
                          accuracy_criterion={"absolute": 0.05, "higher_is_better": True}, max_trials=3,
                          call_path=call_path)
    report = q.report
    served, model_only = report.served_latency_ms, report.selection_latency_ms
    assert set(served) == set(model_only) and len(served) >= 2
    assert "openvino" in wrapped and sorted(wrapped) == sorted(report.trials[i].backend for i in served)
    assert q.backend != "openvino" and report.chosen == min(served, key=served.get)
    ov = [i for i in served if report.trials[i].backend == "openvino"]
    # the 20 ms sleep is inside every timed served call: no CPU makes it shorter; model-only has none
    assert ov and served[ov[0]] >= 20.0 and served[ov[0]] > model_only[ov[0]]
    assert nano_tfx.Report.from_dict(report.to_dict()).served_latency_ms == served


class _TimesItself:
    """A call path that times the finalists itself (``time_side_by_side``, as the Quantizer's
    server-backed one does): it declares OpenVINO the fastest, whatever the model-only order."""

    def __init__(self):
        self.asked: list = []

    def __call__(self, model):  # not used when time_side_by_side exists
        raise AssertionError("time_side_by_side should have been used")

    def time_side_by_side(self, models, budget_s):
        self.asked.append(sorted(m.backend for m in models.values()))
        return {name: 1.0 if m.backend == "openvino" else 50.0 for name, m in models.items()}


def test_a_call_path_that_times_the_finalists_itself_decides(keras3_cnn, digits):
    _, (xte, yte) = digits
    path = _TimesItself()
    q = nano_tfx.quantize(keras3_cnn, accelerator="auto", calib_dataset=(xte, yte), metric="accuracy",
                          accuracy_criterion={"absolute": 0.05, "higher_is_better": True}, max_trials=3,
                          call_path=path)
    served = q.report.served_latency_ms
    assert len(path.asked) == 1 and "openvino" in path.asked[0] and len(path.asked[0]) == len(served) >= 2
    assert q.backend == "openvino" and served[q.report.chosen] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(call_path="serve"), "call_path"),
    (dict(accelerator="onnxruntime", precision="bf16"), "precision"),
    (dict(accelerator="openvino", approach="dynamic"), "approach"),
    (dict(accelerator="openvino", method="qlinear"), "method"),
    (dict(accelerator=None, precision="fp16"), "precision"),
])
def test_unsupported_combinations(keras3_cnn, digits, kwargs, match):
    _, (xte, _) = digits
    with pytest.raises(ValueError, match=match):
        nano_tfx.quantize(keras3_cnn, calib_dataset=xte[:16], **kwargs)


@pytest.mark.parametrize("accelerator", ["onnxruntime", "openvino"])
def test_wrong_shape_per_backend(keras3_cnn, accelerator):
    with pytest.raises(ValueError, match="shape"):
        nano_tfx.quantize(keras3_cnn, accelerator=accelerator, calib_dataset=np.zeros((4, 28, 28, 1), "float32"))


@pytest.mark.parametrize("accelerator", [None, "onnxruntime", "openvino"])
def test_savedmodel_signature_name_is_the_part_quantized(accelerator, keras3_cnn, digits, tmp_path):
    """A SavedModel whose serving_default is *not* the model: every backend must quantize the
    named signature (INC's own loader only ever reads serving_default)."""
    import tensorflow as tf

    _, (xte, yte) = digits
    spec = tf.TensorSpec([None, *xte.shape[1:]], tf.float32, name="image")
    module = tf.Module()
    module.model = keras3_cnn

    @tf.function(input_signature=[spec])
    def logits(image):
        return {"probs": keras3_cnn(image, training=False)}

    @tf.function(input_signature=[spec])
    def inverted(image):  # a decoy: the negated probabilities, argmax is the worst class
        return {"probs": -keras3_cnn(image, training=False)}

    path = str(tmp_path / "two_signatures")
    tf.saved_model.save(module, path, signatures={"serving_default": inverted.get_concrete_function(),
                                                  "classify": logits.get_concrete_function()})
    q = nano_tfx.quantize(path, accelerator=accelerator, signature_name="classify", calib_dataset=xte[:128])
    fp32 = accuracy(keras3_cnn.predict(xte, verbose=0), yte)
    assert accuracy(q.predict(xte), yte) >= fp32 - 0.03
