"""Transform and Trainer module of the reviews pipeline (tf_keras, as tf.Transform expects).

* Transform: the review ``text`` is lowercased, stripped of HTML breaks and punctuation, split on
  whitespace and mapped to ids by a tf.Transform vocabulary (the ``VOCAB_SIZE`` most frequent
  training tokens, one OOV bucket); ids are shifted by one so 0 is padding, truncated / padded to
  ``MAX_LEN`` (``tokens_xf``), with the matching ``padding_mask_xf`` (1 = token). The label is
  passed through as ``label_xf``.
* Trainer: a small transformer encoder over the token ids: token ``Embedding`` + learned position
  ``Embedding``, ``num_blocks`` post-LN blocks of masked ``MultiHeadAttention`` + GELU FFN, masked
  mean pooling, Dense logits; saved with the two signatures of the Quantizer's contract
  (``quantizable_signatures``). Its matmuls (Q/K/V/O projections, the attention products, the
  FFN) are where INT8 pays off; the embeddings stay integer lookups (Gather).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from tfx import v1 as tfx

from pipelines.reviews.features import LABEL_KEY, LABEL_XF, MASK_XF, MAX_LEN, NUM_CLASSES, TEXT_KEY, TOKENS_XF, VOCAB_SIZE
from pipelines.trainer import train_and_save

TRAIN_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 16
VOCAB_FILENAME = "review_tokens"


def tokenize(text: tf.Tensor) -> tf.SparseTensor:
    """[batch] review strings -> sparse [batch, words] lowercase word tokens."""
    text = tf.strings.lower(tf.reshape(text, [-1]))
    text = tf.strings.regex_replace(text, r"<br\s*/?>", " ")
    text = tf.strings.regex_replace(text, r"[^a-z0-9']+", " ")
    return tf.strings.split(text).to_sparse()


def preprocessing_fn(inputs):
    """tf.Transform: text -> token ids [batch, MAX_LEN] (0 = padding) + padding mask; label."""
    ids = tft.compute_and_apply_vocabulary(
        tokenize(inputs[TEXT_KEY]), top_k=VOCAB_SIZE, num_oov_buckets=1, vocab_filename=VOCAB_FILENAME)
    dense = tf.sparse.to_dense(ids, default_value=-1) + 1  # ids 1..VOCAB_SIZE, OOV VOCAB_SIZE+1; 0 = padding
    dense = tf.pad(dense, [[0, 0], [0, MAX_LEN]])[:, :MAX_LEN]
    dense = tf.reshape(dense, [-1, MAX_LEN])  # a static length: tf.Transform's FixedLenFeature
    return {
        TOKENS_XF: dense,
        MASK_XF: tf.cast(dense > 0, tf.int64),
        LABEL_XF: tf.reshape(inputs[LABEL_KEY], [-1, 1]),
    }


def make_model(hidden: int = 32, num_heads: int = 2, num_blocks: int = 2, ffn: int = 64,
               learning_rate: float = 1e-3) -> keras.Model:
    """tokens_xf + padding_mask_xf [MAX_LEN] -> a small transformer encoder -> NUM_CLASSES logits."""
    L = keras.layers
    tokens = keras.Input((MAX_LEN,), dtype="int64", name=TOKENS_XF)
    mask = keras.Input((MAX_LEN,), dtype="int64", name=MASK_XF)
    x = L.Embedding(VOCAB_SIZE + 2, hidden, name="token_embedding")(tokens)
    positions = np.arange(MAX_LEN, dtype=np.int64)[None, :]
    x = x + L.Embedding(MAX_LEN, hidden, name="position_embedding")(positions)
    attend = L.Lambda(lambda m: m[:, None, :] > 0, name="attend")(mask)  # [batch, 1 (query), key]
    for i in range(num_blocks):
        a = L.MultiHeadAttention(num_heads=num_heads, key_dim=hidden // num_heads, name=f"mha{i}")(
            x, x, attention_mask=attend)
        x = L.LayerNormalization(name=f"ln{i}a")(x + a)
        f = L.Dense(ffn, activation="gelu", name=f"ffn{i}a")(x)
        x = L.LayerNormalization(name=f"ln{i}b")(x + L.Dense(hidden, name=f"ffn{i}b")(f))
    pooled = L.Lambda(_masked_mean, name="masked_mean")([x, mask])
    logits = L.Dense(NUM_CLASSES, name="logits")(pooled)
    model = keras.Model(inputs=[tokens, mask], outputs=logits)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def _masked_mean(args):
    x, mask = args
    weights = tf.cast(mask, x.dtype)[:, :, None]
    return tf.reduce_sum(x * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)


def run_fn(fn_args: tfx.components.FnArgs):
    """Train, then save ``serving_default`` (raw tf.Examples) + ``from_transformed_features``."""
    train_and_save(fn_args, make_model, LABEL_KEY, LABEL_XF, TRAIN_BATCH_SIZE, EVAL_BATCH_SIZE, shuffle_seed=0)
