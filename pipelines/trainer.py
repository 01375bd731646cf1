"""The Trainer ``run_fn`` body every pipeline shares: read Transform's output, train, save the two
signatures of the Quantizer's contract. Each pipeline's module only brings ``make_model``."""
from __future__ import annotations

from typing import Callable, List, Optional

import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from tfx import v1 as tfx
from tfx_bsl.public import tfxio

from components import quantizable_signatures
from nano_tfx import skip_autograph_for_tf_keras


def input_fn(file_pattern: List[str], data_accessor, tf_transform_output, batch_size: int,
             label_key: str, shuffle_seed: Optional[int] = None):
    """Batches of transformed features + label, repeated (the Trainer counts steps)."""
    return data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(batch_size=batch_size, label_key=label_key, shuffle_seed=shuffle_seed),
        tf_transform_output.transformed_metadata.schema,
    ).repeat()


def train_and_save(
    fn_args: tfx.components.FnArgs,
    make_model: Callable[..., keras.Model],
    label_key: str,
    transformed_label_key: str,
    train_batch_size: int,
    eval_batch_size: int,
    shuffle_seed: Optional[int] = None,
) -> None:
    """Train ``make_model(**custom_config['hparams'])``, then save ``serving_default`` (raw
    tf.Examples) + ``from_transformed_features`` (``quantizable_signatures``)."""
    skip_autograph_for_tf_keras()
    keras.utils.set_random_seed(0)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)

    def data(files, batch_size):
        return input_fn(files, fn_args.data_accessor, tf_transform_output, batch_size, transformed_label_key,
                        shuffle_seed)

    model = make_model(**dict((fn_args.custom_config or {}).get("hparams", {})))
    model.fit(
        data(fn_args.train_files, train_batch_size),
        steps_per_epoch=fn_args.train_steps,
        validation_data=data(fn_args.eval_files, eval_batch_size),
        validation_steps=fn_args.eval_steps,
        verbose=2,
    )
    signatures = quantizable_signatures(model, tf_transform_output, label_key=label_key)
    tf.saved_model.save(model, fn_args.serving_model_dir, signatures=signatures)
