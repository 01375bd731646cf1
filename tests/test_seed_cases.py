"""The seed project's (BigDL-Nano) own quantization cases, through ``nano_tfx.keras.Model``.

``test_inc_onnx``-style: an untrained ``EfficientNetB0`` (random weights, 10 classes) on random
images. Its softmax is near-uniform: the FP32 rows differ by far less than one INT8 step, so an
INT8 model that gives the same row for every image is *correct* and must not be refused as a
collapsed model (it was, on every backend). The default run quantizes a 32x32 one on all three
backends in one ``accelerator='auto'`` call (one export, one FP32 reference; a refused
candidate would be a failed row); the seed's 224x224, backend by backend, is in the extended set.
"""
import numpy as np
import pytest

BACKENDS = ["inc", "onnxruntime", "openvino"]


def _seed_case(size: int):
    import keras
    import tensorflow as tf

    from nano_tfx.keras import Model

    keras.utils.set_random_seed(0)
    net = keras.applications.EfficientNetB0(weights=None, input_shape=[size, size, 3], classes=10)
    model = Model(inputs=net.inputs, outputs=net.outputs)
    rng = np.random.default_rng(0)
    x = rng.random((100, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(100,))
    return model, x, tf.data.Dataset.from_tensor_slices((x, y))


def _close_to_fp32(q, model, x):
    want = model.predict(x[:8], verbose=0)
    got = np.asarray(q(x[:8]))
    np.testing.assert_allclose(got, want, rtol=5e-2)
    np.testing.assert_allclose(q.predict(x[:8]), got, atol=1e-6)


def test_random_efficientnet_b0_is_quantized_on_every_backend():
    model, x, ds = _seed_case(32)
    q = model.quantize(precision="int8", accelerator="auto", calib_dataset=ds)
    trials = {t.backend: t for t in q.report.trials}
    assert set(trials) == set(BACKENDS)
    assert not any(t.failed for t in trials.values()), {b: t.error for b, t in trials.items()}
    _close_to_fp32(q, model, x)


@pytest.mark.extended
@pytest.mark.parametrize("accelerator", BACKENDS)
def test_the_seeds_224px_case_on_each_backend(accelerator):
    model, x, ds = _seed_case(224)
    q = model.quantize(precision="int8", accelerator=None if accelerator == "inc" else accelerator, calib_dataset=ds)
    assert q.backend == accelerator and not any(t.failed for t in q.report.trials)
    _close_to_fp32(q, model, x)
