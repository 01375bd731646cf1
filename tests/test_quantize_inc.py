"""The Keras API and nano_tfx.quantize on Intel Neural Compressor (accelerator=None), for real."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import nano_tfx
from conftest import accuracy, build_cnn
from nano_tfx.keras import Model, Sequential

SPARSE_ACC = None


def sparse_acc():
    import keras

    return keras.metrics.SparseCategoricalAccuracy()


class TorchStyleAccuracy:
    """torchmetrics' protocol without torch (the seed's `Accuracy()`)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.correct = self.total = 0

    def update(self, preds, target):
        self.correct += int((np.asarray(preds).argmax(-1) == np.asarray(target).reshape(-1)).sum())
        self.total += len(target)

    def compute(self):
        return self.correct / max(self.total, 1)


@pytest.fixture(scope="module")
def seed_model():
    """The seed document's step 1-3, verbatim but for the import."""
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=[40, 40, 3], classes=10)
    model = Model(inputs=model.inputs, outputs=model.outputs)
    train_examples = np.random.random((100, 40, 40, 3))
    train_labels = np.random.randint(0, 10, size=(100,))
    train_dataset = tf.data.Dataset.from_tensor_slices((train_examples, train_labels))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_dataset.batch(32), verbose=0)  # the seed's fit, batched by the caller
    return model, train_examples, train_dataset


def test_seed_example_default(seed_model):
    model, train_examples, train_dataset = seed_model
    q_model = model.quantize(calib_dataset=train_dataset)
    y_hat = q_model(train_examples)
    assert tuple(y_hat.shape) == (100, 10)
    np.testing.assert_allclose(np.asarray(y_hat).sum(-1), 1.0, atol=1e-3)
    loss, acc = q_model.evaluate(train_dataset)
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0
    assert q_model.predict(train_dataset).shape == (100, 10)
    assert q_model.backend == "inc" and q_model.precision == "int8"
    assert len(q_model.report.trials) == 1 and q_model.report.met is None  # no search without a metric


@pytest.mark.extended  # ~1 min of bayesian trials on a MobileNetV2; strategies are covered in the default set
def test_seed_example_accuracy_control(seed_model):
    model, train_examples, train_dataset = seed_model
    try:
        q_model = model.quantize(precision='int8',
                                 accelerator=None,
                                 calib_dataset=train_dataset,
                                 metric=TorchStyleAccuracy(),
                                 accuracy_criterion={'relative': 0.01, 'higher_is_better': True},
                                 approach='static',
                                 tuning_strategy='bayesian',
                                 timeout=0,
                                 max_trials=10,
                                 )
    except nano_tfx.AccuracyCriterionNotMet as err:  # the seed: exit and raise when nothing meets it
        assert len(err.report.trials) == 10 and err.best_model is not None
        return
    assert q_model.report.met and 1 <= len(q_model.report.trials) <= 10
    assert tuple(q_model(train_examples).shape) == (100, 10)
    q_model.evaluate(train_dataset)
    q_model.predict(train_dataset)


def test_digits_int8_within_one_percent(keras3_cnn, digits):
    _, (xte, yte) = digits
    fp32 = accuracy(keras3_cnn.predict(xte, verbose=0), yte)
    q = nano_tfx.quantize(keras3_cnn, calib_dataset=(xte, yte), metric=sparse_acc(),
                          accuracy_criterion={"relative": 0.01, "higher_is_better": True}, batch=64)
    int8 = accuracy(q.predict(xte), yte)
    assert fp32 > 0.9
    assert int8 >= fp32 * 0.99, (fp32, int8)
    assert q.report.met and q.report.baseline == pytest.approx(fp32, abs=1e-6)
    js = q.report.to_json()
    assert '"chosen"' in js and '"trials"' in js


def test_tf_keras_model(tf_keras_cnn, digits):
    _, (xte, yte) = digits
    fp32 = accuracy(tf_keras_cnn.predict(xte, verbose=0), yte)
    ds = tf.data.Dataset.from_tensor_slices((xte, yte)).batch(32)
    q = nano_tfx.quantize(tf_keras_cnn, calib_dataset=ds, metric="accuracy",
                          accuracy_criterion={"relative": 0.01, "higher_is_better": True})
    assert accuracy(q.predict(xte), yte) >= fp32 * 0.99


def test_keras3_sequential_and_subclassed(digits):
    import keras

    (xtr, ytr), (xte, yte) = digits
    seq = Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    seq.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    seq.fit(xtr, ytr, epochs=2, verbose=0)
    q = seq.quantize(calib_dataset=xte[:64])
    assert q.predict(xte).shape == (len(xte), 10)
    agree = (q.predict(xte).argmax(-1) == seq.predict(xte, verbose=0).argmax(-1)).mean()
    assert agree > 0.9

    class Sub(Model):
        def __init__(self):
            super().__init__()
            self.flat = keras.layers.Flatten()
            self.dense = keras.layers.Dense(10)

        def call(self, x):
            return self.dense(self.flat(x))

    sub = Sub()
    sub(xte[:1])
    with pytest.raises(ValueError, match="input_spec"):
        sub.quantize(calib_dataset=xte[:64])
    q = sub.quantize(calib_dataset=xte[:64], input_spec=tf.TensorSpec((None, 8, 8, 1), tf.float32))
    got, want = q.predict(xte[:64]).ravel(), sub.predict(xte[:64], verbose=0).ravel()
    assert np.corrcoef(got, want)[0, 1] > 0.95


def test_keras3_own_quantize_modes_stay_reachable():
    import keras

    m = Model(*build_cnn(keras))
    m.quantize("int8")  # Keras 3's weight-only int8, in place
    assert m.get_layer("probs").dtype_policy.quantization_mode == "int8"
    m2 = Model(*build_cnn(keras))
    m2.quantize(mode="int8")
    assert m2.get_layer("probs").dtype_policy.quantization_mode == "int8"


def test_save_load_roundtrip(keras3_cnn, digits, tmp_path):
    _, (xte, yte) = digits
    q = nano_tfx.quantize(keras3_cnn, calib_dataset=xte[:128])
    before = q.predict(xte)
    q.save(tmp_path / "q")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers
    loaded = nano_tfx.load(tmp_path / "q")
    np.testing.assert_allclose(loaded.predict(xte), before, atol=1e-6)
    assert loaded.backend == "inc" and loaded.precision == "int8" and loaded.report is not None
    # The pushed directory is also a plain TF SavedModel with serving_default.
    sig = tf.saved_model.load(str(tmp_path / "q")).signatures["serving_default"]
    out = list(sig(**{q.inputs[0].name: tf.constant(xte[:4])}).values())[0].numpy()
    np.testing.assert_allclose(out, before[:4], atol=1e-5)
    q.save(tmp_path / "q")  # overwrite in place
    assert nano_tfx.load(tmp_path / "q").predict(xte[:2]).shape == (2, 10)


def _worse_when_quantized(model):
    """An eval_func the INT8 model can never satisfy: FP32 scores 1, anything else 0.5."""
    return 1.0 if model.backend == "tensorflow" else 0.5


def test_unmet_criterion_raises_with_best_model(keras3_cnn, digits):
    _, (xte, _) = digits
    with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as info:
        nano_tfx.quantize(keras3_cnn, calib_dataset=xte[:64], eval_func=_worse_when_quantized,
                          accuracy_criterion={"relative": 0.01, "higher_is_better": True}, max_trials=3)
    err = info.value
    assert len(err.report.trials) == 3 and err.report.met is False
    assert err.best_model.predict(xte[:4]).shape == (4, 10)
    assert len({t.key for t in err.report.trials}) == 3


# random/exhaustive/mse proposal orders are pinned in milliseconds by tests/test_strategies.py;
# a real INC run of each is in the extended set.
@pytest.mark.parametrize("strategy", ["basic", "bayesian"] + [
    pytest.param(s, marks=pytest.mark.extended) for s in ("random", "exhaustive", "mse")])
def test_each_strategy_proposes_distinct_trials(keras3_cnn, digits, strategy):
    _, (xte, yte) = digits
    with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as info:
        nano_tfx.quantize(keras3_cnn, calib_dataset=(xte[:64], yte[:64]), eval_func=_worse_when_quantized,
                          accuracy_criterion={"absolute": 0.01}, tuning_strategy=strategy, max_trials=2)
    assert len({t.key for t in info.value.report.trials}) == 2
    assert info.value.report.strategy == strategy


def test_timeout_is_honoured(keras3_cnn, digits):
    _, (xte, _) = digits
    start = time.perf_counter()
    with pytest.raises(nano_tfx.AccuracyCriterionNotMet) as info:
        nano_tfx.quantize(keras3_cnn, calib_dataset=xte[:64], eval_func=_worse_when_quantized,
                          accuracy_criterion={"relative": 0.01}, timeout=1, max_trials=50)
    report = info.value.report
    assert "timeout" in report.stop_reason and len(report.trials) < 50
    # The first trial always runs; later ones only start when expected to end in time, so what
    # they took together fits in the timeout (relative to measured trials: any CPU speed).
    assert sum(t.seconds for t in report.trials[1:]) <= 1.0
    assert time.perf_counter() - start >= report.trials[0].seconds


@pytest.mark.parametrize("kwargs, match", [
    (dict(accelerator="tensorrt"), "accelerator"),
    (dict(precision="int4"), "precision"),
    (dict(approach="qat"), "approach"),
    (dict(approach="dynamic"), "approach"),
    (dict(tuning_strategy="greedy"), "tuning_strategy"),
    (dict(accuracy_criterion={"relative": 0.01}), "accuracy_criterion"),  # no metric
    (dict(metric="accuracy", accuracy_criterion={"relative": 0.01, "bogus": 1}), "accuracy_criterion"),
    (dict(metric="accuracy", accuracy_criterion={"relative": 1.5}), "accuracy_criterion"),
    (dict(metric="accuracy", accuracy_criterion={"absolute": -1}), "accuracy_criterion"),
    (dict(metric="accuracy", max_trials=0), "max_trials"),
    (dict(metric="accuracy", timeout=-1), "timeout"),
])
def test_bad_arguments(keras3_cnn, digits, kwargs, match):
    _, (xte, yte) = digits
    with pytest.raises(ValueError, match=match):
        nano_tfx.quantize(keras3_cnn, calib_dataset=(xte[:32], yte[:32]), **kwargs)


@pytest.mark.parametrize("data, match", [
    (np.zeros((8, 8, 8, 3), "float32"), "shape"),
    (np.zeros((8, 9, 9, 1), "float32"), "shape"),
    (np.zeros((0, 8, 8, 1), "float32"), "empty"),
    (None, "calib_dataset"),
])
def test_bad_calibration_data(keras3_cnn, data, match):
    with pytest.raises(ValueError, match=match):
        nano_tfx.quantize(keras3_cnn, calib_dataset=data)


def test_metric_without_labels_is_rejected(keras3_cnn, digits):
    _, (xte, _) = digits
    with pytest.raises(ValueError, match="label"):
        nano_tfx.quantize(keras3_cnn, calib_dataset=xte[:32], metric="accuracy")


def test_inputs_of_the_other_keras_are_refused_by_name():
    """tf.keras resolved to the other Keras (tensorflow_transform set TF_USE_LEGACY_KERAS after
    nano_tfx.keras was imported): a clear error, not Keras' "must be KerasTensors"."""
    import importlib

    from nano_tfx.keras import KERAS_FLAVOR

    other = importlib.import_module("keras" if KERAS_FLAVOR == "tf_keras" else "tf_keras")
    inp = other.Input((4,))
    with pytest.raises(ValueError, match="inputs: expected .*TF_USE_LEGACY_KERAS"):
        Model(inp, other.layers.Dense(3)(inp))
    with pytest.raises(ValueError, match="inputs: expected"):
        Model(inputs=[inp], outputs=other.layers.Dense(3)(inp))


def test_legacy_keras_chosen_from_the_variable(tmp_path):
    """TF_USE_LEGACY_KERAS=1 → tf_keras subclasses, even when keras 3 was imported first."""
    code = (
        "import keras, numpy as np, nano_tfx\n"
        "from nano_tfx.keras import Model, KERAS_FLAVOR\n"
        "import tf_keras\n"
        "assert KERAS_FLAVOR == 'tf_keras' and issubclass(Model, tf_keras.Model), Model.__mro__\n"
        "inp = tf_keras.Input((4,)); m = Model(inp, tf_keras.layers.Dense(3)(inp))\n"
        "q = m.quantize(calib_dataset=np.random.rand(16, 4).astype('float32'))\n"
        "print('OK', q.predict(np.random.rand(2, 4)).shape)\n"
    )
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "OK (2, 3)" in out.stdout, out.stderr[-2000:]
