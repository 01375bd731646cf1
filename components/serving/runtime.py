"""The MLServer custom runtime: V2 Open Inference Protocol tensors <-> a ``Servable``.

A raw-examples model takes ``{"name": "examples", "datatype": "BYTES", "shape": [N], "data":
[base64 of a serialized tf.Example, ...], "parameters": {"content_type": "base64"}}`` and answers
one output per FP32 ``serving_default`` output. A model without a transform graph takes its own
named inputs (numeric datatypes, data flat or nested, shape batch-first). Anything malformed is
an ``MLServerError`` with a 4xx status and a one-line message; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from typing import Any

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor

from components.serving.servable import RequestError, Servable, load_servable

logger = logging.getLogger("nano_tfx")

#: V2 datatype -> numpy dtype (BYTES handled apart)
V2_DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_V2 = {np.dtype(v): k for k, v in V2_DTYPES.items()}

DEFAULT_MAX_BATCH = 1024  # examples (rows) per request


class BadRequest(MLServerError):
    def __init__(self, msg: str, status_code: int = 400):
        super().__init__(msg, status_code)


def _v2_datatype(dtype: np.dtype) -> str:
    return "BYTES" if dtype == np.dtype(object) else NUMPY_TO_V2.get(np.dtype(dtype), "FP32")


def _decode_bytes(name: str, data: list, content_type: Any) -> np.ndarray:
    """Each element a base64 string (the only way binary tf.Examples fit in JSON)."""
    if content_type not in (None, "base64"):
        raise BadRequest(f"{name}: expected parameters.content_type 'base64', got {content_type!r}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise BadRequest(f"{name}: element {i}: expected a base64 string, got {type(item).__name__}")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"{name}: element {i} is not valid base64 ({err})") from err
    return np.array(out, dtype=object)


def decode_input(request_input: Any, spec: Any, max_batch: int) -> np.ndarray:
    """One V2 request input -> a numpy array of the model's dtype, checked against ``spec``."""
    name, datatype, shape = request_input.name, request_input.datatype, list(request_input.shape)
    want = _v2_datatype(spec.dtype)
    if datatype != want:
        raise BadRequest(f"{name}: expected datatype {want}, got {datatype}")
    if not shape or shape[0] < 1:
        raise BadRequest(f"{name}: expected a non-empty batch (shape [N, ...] with N >= 1), got shape {shape}")
    if shape[0] > max_batch:
        raise BadRequest(f"{name}: batch of {shape[0]} exceeds the server's --max-batch-size {max_batch}", 413)
    data = request_input.data.__root__
    params = request_input.parameters
    if datatype == "BYTES":
        if len(shape) != 1:
            raise BadRequest(f"{name}: expected shape [N] (one serialized tf.Example per row), got {shape}")
        flat = data if isinstance(data, list) else [data]
        array = _decode_bytes(name, flat, getattr(params, "content_type", None))
    else:
        try:
            array = np.asarray(data, dtype=V2_DTYPES[datatype]).reshape(-1)
        except (TypeError, ValueError) as err:
            raise BadRequest(f"{name}: data is not {datatype} numbers ({err})") from err
    count = int(np.prod(shape))
    if array.size != count:
        raise BadRequest(f"{name}: shape {shape} needs {count} values, got {array.size}")
    array = array.reshape(shape)
    model_shape = spec.shape
    if len(model_shape) != len(shape) or any(m is not None and m != g for m, g in zip(model_shape[1:], shape[1:])):
        raise BadRequest(f"{name}: expected shape {[('N' if d is None else d) for d in model_shape]}, got {shape}")
    return array


class NanoTfxRuntime(MLModel):
    """Serves one model folder (``parameters.uri``) through ``components.serving.servable``."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self._max_batch = int(extra.get("max_batch", DEFAULT_MAX_BATCH))
        uri = self.settings.parameters.uri
        self._servable: Servable = load_servable(uri, thread_num=extra.get("thread_num"))
        # One engine call at a time per model: an OpenVINO InferRequest is not reentrant ("Infer
        # Request is busy"), and every engine already spreads one call over all cores.
        self._engine_lock = threading.Lock()
        self._specs = {t.name: t for t in self._servable.inputs}
        self.inputs = [MetadataTensor(name=t.name, datatype=_v2_datatype(t.dtype),
                                      shape=[-1 if d is None else d for d in t.shape])
                       for t in self._servable.inputs]
        logger.info("model %s: %s from %s, inputs %s, outputs %s", self.name, self._servable.layout, uri,
                    [t.name for t in self._servable.inputs], self._servable.outputs)
        self.ready = True
        return self.ready

    def _decode(self, payload: InferenceRequest) -> dict:
        names = [i.name for i in payload.inputs]
        expected = sorted(self._specs)
        if sorted(names) != expected:
            raise BadRequest(f"inputs: expected {expected}, got {names}")
        arrays = {i.name: decode_input(i, self._specs[i.name], self._max_batch) for i in payload.inputs}
        rows = {len(a) for a in arrays.values()}
        if len(rows) != 1:
            raise BadRequest(f"inputs: every input needs the same batch size, got {sorted(rows)}")
        return arrays

    def _predict_locked(self, arrays: dict) -> dict:
        with self._engine_lock:
            return self._servable.predict(arrays)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        arrays = self._decode(payload)
        # The engines block: run them off the event loop so health checks and other requests
        # are still answered (TF, ONNX Runtime and OpenVINO release the GIL while computing).
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(None, self._predict_locked, arrays)
        except RequestError as err:
            raise BadRequest(str(err)) from err
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, np.ascontiguousarray(value)) for name, value in outputs.items()],
        )
