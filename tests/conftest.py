"""Shared fixtures: small real models trained on scikit-learn's digits (8x8x1, 10 classes)."""
import os
import sys

# NANO_TFX_TEST_CPU_SPEED=10 (or 0.1): run the suite as on a CPU 10x faster (slower); see
# tests/cpu_speed_sim.py. Installed before anything imports a clock function.
if os.environ.get("NANO_TFX_TEST_CPU_SPEED"):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, _here)
    import cpu_speed_sim

    _factor = float(os.environ["NANO_TFX_TEST_CPU_SPEED"])
    cpu_speed_sim.install(_factor)
    os.environ.update(cpu_speed_sim.subprocess_env(_factor))  # subprocesses (CLI, pipelines, Beam workers) too

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # before TensorFlow: INC's INT8 kernels need it
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import nano_tfx  # noqa: F401,E402
import tensorflow as _tf  # noqa: E402

# Bind ``tf.keras`` now, from TF_USE_LEGACY_KERAS as the session starts (Keras 3 unless set):
# importing tensorflow_transform sets the variable to "1", and ``tf.keras`` binds on first use, so
# a TFX test running first made it tf_keras for every later test (the seed example then handed
# tf_keras tensors to nano_tfx.keras' Keras 3 ``Model``). The default order bound it to Keras 3
# by accident; this makes every order do so.
_tf.keras.Model  # noqa: B018


def digits_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


@pytest.fixture(scope="session")
def digits():
    return digits_split()


def build_cnn(keras_module, seed: int = 0):
    keras_module.utils.set_random_seed(seed)
    L = keras_module.layers
    inp = keras_module.Input((8, 8, 1), name="image")
    x = L.Conv2D(16, 3, activation="relu", padding="same")(inp)
    x = L.Conv2D(32, 3, activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    x = L.Dense(64, activation="relu")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    return inp, out


def train(model, digits, epochs: int = 6):
    (xtr, ytr), _ = digits
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def keras3_cnn(digits):
    import keras

    inp, out = build_cnn(keras)
    return train(keras.Model(inp, out), digits)


@pytest.fixture(scope="session")
def tf_keras_cnn(digits):
    import tf_keras

    inp, out = build_cnn(tf_keras)
    return train(tf_keras.Model(inp, out), digits)


def accuracy(probs, y) -> float:
    return float((np.asarray(probs).argmax(-1) == np.asarray(y).reshape(-1)).mean())


# The TFX end-to-end modules (Quantizer executor, penguin/digits pipelines, orchestrators, CLI)
# run by default (~10 of the suite's minutes); NANO_TFX_QUICK=1 skips them for a fast local loop.
E2E_MODULES = {
    "test_components_quantizer.py", "test_components_quantizer_executor.py", "test_pipeline_penguin.py",
    "test_pipeline_digits.py", "test_orchestrators.py", "test_cli.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: long matrices (NANO_TFX_EXTENDED=1 runs them)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NANO_TFX_EXTENDED") != "1":
        extended = pytest.mark.skip(reason="extended matrix: NANO_TFX_EXTENDED=1 runs it")
        for item in items:
            if "extended" in item.keywords:
                item.add_marker(extended)
    if os.environ.get("NANO_TFX_QUICK") != "1":
        return
    skip = pytest.mark.skip(reason="TFX end-to-end module: skipped by NANO_TFX_QUICK=1")
    for item in items:
        if os.path.basename(str(item.fspath)) in E2E_MODULES:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def leaves_the_working_directory_alone():
    """Nothing a test runs may drop files into the caller's working directory (ONNX Runtime's
    symbolic shape inference did: ``sym_shape_infer_temp.onnx`` + a uuid-named data file)."""
    cwd = os.getcwd()
    before = set(os.listdir(cwd))
    yield
    new = set(os.listdir(cwd)) - before
    assert not new, f"the test left {sorted(new)} in the working directory {cwd}"
