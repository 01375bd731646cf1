"""A transformer encoder with activation outlier channels, the case SmoothQuant exists for.

A pre-LN encoder block (LayerNorm → MultiHeadAttention, LayerNorm → GELU feed-forward) and a
LayerNorm → Dense head. A few output channels of every LayerNorm are scaled ×50-×100 (its
gamma/beta) and the Dense layers reading them divide the matching kernel rows by the same factor:
the FP32 function is unchanged (up to float rounding), but every LayerNorm output now has a few
channels 50-100x larger than the rest, as in trained LLMs/BERTs. Per-tensor INT8 activations
then spend their 256 levels on those channels and round the others to a few levels.

Deterministic and untrained: the labels are the FP32 model's own classes, kept where its top
logit leads the runner-up by a margin, so FP32 scores 1.0 and only a real quantization error
(not a near tie) flips a label.
"""
from __future__ import annotations

import contextlib
import importlib

import numpy as np

SEQ, FEAT, HIDDEN, CLASSES = 8, 16, 32, 4
#: LayerNorm output channels made outliers, and their factors
OUTLIERS = {3: 60.0, 11: 80.0, 20: 100.0}


def keras_module(flavor: str):
    return importlib.import_module("keras" if flavor == "keras3" else "tf_keras")


def outlier_encoder(flavor: str, outliers: dict[int, float] | None = None, seed: int = 0):
    """The encoder; ``outliers`` {channel: factor} ({} : the same model without outliers)."""
    keras = keras_module(flavor)
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((SEQ, FEAT), name="features")
    e = L.Dense(HIDDEN, name="embed")(inp)
    h1 = L.LayerNormalization(name="ln1")(e)
    a = L.MultiHeadAttention(num_heads=2, key_dim=HIDDEN // 2, name="mha")(h1, h1)
    h = L.Add(name="res1")([e, a])
    h2 = L.LayerNormalization(name="ln2")(h)
    f = L.Dense(2 * HIDDEN, activation="gelu", name="ff1")(h2)
    h = L.Add(name="res2")([h, L.Dense(HIDDEN, name="ff2")(f)])
    p = L.GlobalAveragePooling1D(name="pool")(h)
    p = L.LayerNormalization(name="ln_head")(p)
    out = L.Dense(CLASSES, activation="softmax", name="probs")(p)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for ln in ("ln1", "ln2", "ln_head"):  # a trained LayerNorm's affine part is not the identity
        layer = model.get_layer(ln)
        gamma, beta = layer.get_weights()
        layer.set_weights([(gamma * rng.uniform(0.5, 1.5, gamma.shape)).astype("float32"),
                           (0.1 * rng.standard_normal(beta.shape)).astype("float32")])
    head = model.get_layer("probs")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 4.0, bias])  # clear class margins
    plant_outliers(model, OUTLIERS if outliers is None else outliers)
    return model


def _readers(model, ln: str):
    """The kernels that read ``ln``'s output, as (layer, index of the kernel in get_weights)."""
    mha = model.get_layer("mha")
    if ln == "ln1":
        return [(sub, 0) for sub in (mha._query_dense, mha._key_dense, mha._value_dense)]
    return [(model.get_layer({"ln2": "ff1", "ln_head": "probs"}[ln]), 0)]


def plant_outliers(model, outliers: dict[int, float]) -> None:
    """Scale the channels of every LayerNorm output and compensate in the kernels reading them."""
    if not outliers:
        return
    channels = np.array(sorted(outliers))
    factors = np.array([outliers[c] for c in channels], np.float32)
    for ln in ("ln1", "ln2", "ln_head"):
        layer = model.get_layer(ln)
        gamma, beta = layer.get_weights()
        gamma[channels] *= factors
        beta[channels] *= factors
        layer.set_weights([gamma, beta])
        for reader, index in _readers(model, ln):
            weights = reader.get_weights()
            weights[index][channels] /= factors.reshape((-1,) + (1,) * (weights[index].ndim - 1))
            reader.set_weights(weights)


def features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, SEQ, FEAT)).astype("float32")


def labelled(model, n: int, seed: int, keep: float = 0.7):
    """``n`` rows the model classifies with a clear margin (the ``keep`` share with the widest
    top-1 vs top-2 log-probability gap out of ``n / keep`` drawn), labelled with its own class."""
    x = features(int(n / keep), seed)
    probs = np.asarray(model.predict(x, verbose=0, batch_size=256))
    logp = np.log(np.maximum(probs, 1e-12))
    top2 = np.sort(logp, axis=-1)[:, -2:]
    order = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")[:n]
    order.sort()
    return x[order], probs[order].argmax(-1).astype("int64")


@contextlib.contextmanager
def smoothing_off(backends=("inc", "onnxruntime", "openvino")):
    """The backends' search spaces without the ``smooth_quant`` knob (what they were before
    SmoothQuant): for comparisons, and for tests of the FP32-fallback mechanics on models with
    outlier channels, which SmoothQuant would otherwise fix first."""
    import pytest

    from nano_tfx.backends.base import SMOOTH_QUANT, SearchSpace, backend_class

    with pytest.MonkeyPatch.context() as mp:
        for name in backends:
            cls = backend_class(name)

            def search_space(self, prepared, precision, approach, _original=cls.search_space):
                space = _original(self, prepared, precision, approach)
                knobs = {k: v for k, v in space.knobs.items() if k != SMOOTH_QUANT}
                return SearchSpace(knobs, space.fallback_candidates, space.guided, space.refinements)

            mp.setattr(cls, "search_space", search_space)
        yield
