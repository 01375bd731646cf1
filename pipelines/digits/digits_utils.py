"""Transform and Trainer module of the digits pipeline (tf_keras, as tf.Transform expects).

Referenced by import path (``preprocessing_fn=`` / ``run_fn=``), so no module-file wheel is built
and the same module works locally, on Airflow and in the KFP container image.

* Transform: the 64 raw integer pixel columns become one ``image_xf`` float vector [64] scaled to
  [0, 1] with the *global* min/max of the training data (a tf.Transform analyzer); the label is
  passed through as ``label_xf``.
* Trainer: a small CNN over ``image_xf`` reshaped to 8x8x1 (conv-heavy: where INT8 pays off),
  saved with the two signatures of the Quantizer's contract (``quantizable_signatures``).
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from tfx import v1 as tfx

from pipelines.digits.features import IMAGE_SHAPE, IMAGE_XF, LABEL_KEY, LABEL_XF, NUM_CLASSES, PIXEL_KEYS
from pipelines.trainer import train_and_save

TRAIN_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 32


def preprocessing_fn(inputs):
    """tf.Transform: stack the pixels into one [batch, 64] float image, scale it to [0, 1]."""
    columns = [tf.reshape(tf.cast(inputs[k], tf.float32), [-1, 1]) for k in PIXEL_KEYS]
    image = tf.concat(columns, axis=1)
    return {
        IMAGE_XF: tft.scale_to_0_1(image, elementwise=False),
        LABEL_XF: tf.reshape(inputs[LABEL_KEY], [-1, 1]),
    }


def make_model(filters: int = 16, dense_units: int = 64, learning_rate: float = 3e-3) -> keras.Model:
    """image_xf [64] → 8x8x1 → Conv(f) → Conv(2f) → MaxPool → Dense → 10 logits."""
    inp = keras.layers.Input(shape=(64,), name=IMAGE_XF)
    x = keras.layers.Reshape(IMAGE_SHAPE)(inp)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(2 * filters, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense_units, activation="relu")(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    model = keras.Model(inputs=inp, outputs=logits)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def run_fn(fn_args: tfx.components.FnArgs):
    """Train, then save ``serving_default`` (raw tf.Examples) + ``from_transformed_features``."""
    train_and_save(fn_args, make_model, LABEL_KEY, LABEL_XF, TRAIN_BATCH_SIZE, EVAL_BATCH_SIZE)
