"""Models with a known accuracy culprit, for the diagnosis tests and ``diagnosis_bench.py``.

``deep_mlp_with_outlier``: a deep ReLU MLP trained on the digits, then one deep layer's input
gets a 1000x outlier channel while the FP32 function stays the same (ReLU is positively
homogeneous: scale one unit of layer k-1 by 1000, divide the matching row of layer k's kernel by
1000). Per-tensor activation quantization of layer k's input then spends its whole range on that
channel and wipes the others: full INT8 misses any tight criterion because of layer k alone.
"""
from __future__ import annotations

import numpy as np


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def plant_outlier(model, layer_name: str, factor: float = 1000.0, channel: int | None = None) -> int:
    """Give ``layer_name``'s input a ``factor``x channel without changing the function.

    The layer before it (a ReLU Dense/Conv) gets that output channel scaled up; ``layer_name``'s
    kernel gets the matching input row scaled down. Returns the channel used.
    """
    names = [layer.name for layer in model.layers]
    k = names.index(layer_name)
    prev = next(layer for layer in reversed(model.layers[:k]) if layer.get_weights())
    w_prev, b_prev = prev.get_weights()
    w, b = model.layers[k].get_weights()
    if channel is None:  # the most used unit, so the quantization really loses information
        channel = int(np.argmax(np.abs(w).sum(axis=-1)))
    w_prev = w_prev.copy(); b_prev = b_prev.copy(); w = w.copy()
    w_prev[..., channel] *= factor
    b_prev[channel] *= factor
    w[..., channel, :] /= factor
    prev.set_weights([w_prev, b_prev])
    model.layers[k].set_weights([w, b])
    return channel


def deep_mlp_with_outlier(keras_module, data, depth: int = 12, bad: int | None = None, width: int = 64,
                          epochs: int = 8, seed: int = 0):
    """A ``depth``-layer ReLU MLP on digits; layer ``fc{bad}`` (default: 3/4 deep) is the culprit."""
    keras_module.utils.set_random_seed(seed)
    L = keras_module.layers
    inp = keras_module.Input((8, 8, 1), name="image")
    x = L.Flatten()(inp)
    for i in range(depth):
        x = L.Dense(width, activation="relu", name=f"fc{i}")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    model = keras_module.Model(inp, out)
    (xtr, ytr), _ = data
    model.compile(optimizer=keras_module.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0)
    bad = int(depth * 3 // 4) if bad is None else bad
    plant_outlier(model, f"fc{bad}")
    return model, f"fc{bad}"


def small_mobilenet(keras_module, data, epochs: int = 3, size: int = 32, seed: int = 0):
    """A MobileNetV2-style net (inverted residuals, depthwise convs, ReLU6) trained briefly on
    the digits upsampled to ``size`` x ``size``; returns (model, upsampled data)."""
    import tensorflow as tf

    keras_module.utils.set_random_seed(seed)
    L = keras_module.layers
    (xtr, ytr), (xte, yte) = data
    up = lambda x: tf.image.resize(x, (size, size)).numpy()  # noqa: E731
    xtr, xte = up(xtr), up(xte)

    # Keras' default BN momentum (0.99) leaves the moving statistics near their initial values
    # after the ~80 steps of a quick run: inference-mode top-1 then sits at chance (0.08).
    def BN(name):  # noqa: N802
        return L.BatchNormalization(momentum=0.9, name=name)

    def block(x, cin, cout, stride, expand, name):
        h = L.Conv2D(cin * expand, 1, use_bias=False, name=f"{name}_expand")(x)
        h = BN(name=f"{name}_expand_bn")(h)
        h = L.ReLU(6.0)(h)
        h = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(h)
        h = BN(name=f"{name}_dw_bn")(h)
        h = L.ReLU(6.0)(h)
        h = L.Conv2D(cout, 1, use_bias=False, name=f"{name}_project")(h)
        h = BN(name=f"{name}_project_bn")(h)
        return L.Add()([x, h]) if stride == 1 and cin == cout else h

    inp = keras_module.Input((size, size, 1), name="image")
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = BN(name="stem_bn")(x)
    x = L.ReLU(6.0)(x)
    cfg = [(16, 16, 1, 1), (16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 2, 4), (32, 32, 1, 4), (32, 64, 1, 4),
           (64, 64, 1, 4), (64, 96, 2, 4), (96, 96, 1, 4)]
    for i, (cin, cout, s, e) in enumerate(cfg):
        x = block(x, cin, cout, s, e, f"block{i}")
    x = L.Conv2D(256, 1, use_bias=False, name="head")(x)
    x = BN(name="head_bn")(x)
    x = L.ReLU(6.0)(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    model = keras_module.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0)
    return model, ((xtr, ytr), (xte, yte))
