"""The FP32 reference: the interchange SavedModel's signature, run by TensorFlow.

It gives the accuracy baseline and the reference outputs the ``mse`` strategy compares with;
it is never a quantization result.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nano_tfx.backends.base import Candidate
from nano_tfx.interchange import SavedModelSource


class TFSignatureCandidate(Candidate):
    backend = "tensorflow"
    precision = "fp32"

    def __init__(self, source: SavedModelSource):
        import tensorflow as tf

        self._tf = tf
        self.source = source
        self._loaded, self._fn = source.load_signature()
        self._in = source.input_names
        self._out = source.output_names

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = self._fn(**{n: self._tf.constant(a) for n, a in zip(self._in, inputs)})
        return [result[n].numpy() for n in self._out]

    def save(self, directory: str) -> None:
        import shutil

        shutil.copytree(self.source.path, directory, dirs_exist_ok=True)
