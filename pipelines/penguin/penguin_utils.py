"""Transform and Trainer module of the penguin pipeline (tf_keras, like TFX's penguin example).

Referenced by import path (``preprocessing_fn=`` / ``run_fn=``), so no module-file wheel is built.
The Trainer saves the two signatures the Quantizer needs via ``quantizable_signatures``.
"""
from __future__ import annotations

import tensorflow_transform as tft
import tf_keras as keras
from tfx import v1 as tfx

from pipelines.trainer import train_and_save

FEATURE_KEYS = ["culmen_length_mm", "culmen_depth_mm", "flipper_length_mm", "body_mass_g"]
LABEL_KEY = "species"
NUM_CLASSES = 3
TRAIN_BATCH_SIZE = 20
EVAL_BATCH_SIZE = 10


def transformed_name(key: str) -> str:
    return key + "_xf"


def preprocessing_fn(inputs):
    """tf.Transform: z-score every numeric feature, pass the label through."""
    outputs = {transformed_name(k): tft.scale_to_z_score(inputs[k]) for k in FEATURE_KEYS}
    outputs[transformed_name(LABEL_KEY)] = inputs[LABEL_KEY]
    return outputs


def make_model(hidden_units: int = 16, num_layers: int = 2, learning_rate: float = 1e-2) -> keras.Model:
    inputs = [keras.layers.Input(shape=(1,), name=transformed_name(f)) for f in FEATURE_KEYS]
    x = keras.layers.concatenate(inputs)
    for _ in range(num_layers):
        x = keras.layers.Dense(hidden_units, activation="relu")(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def run_fn(fn_args: tfx.components.FnArgs):
    """Train, then save ``serving_default`` (raw tf.Examples) + ``from_transformed_features``."""
    train_and_save(fn_args, make_model, LABEL_KEY, transformed_name(LABEL_KEY), TRAIN_BATCH_SIZE, EVAL_BATCH_SIZE,
                   shuffle_seed=0)
