"""The MLServer custom runtime: V2 Open Inference Protocol tensors <-> a ``Servable``.

A raw-examples model takes ``{"name": "examples", "datatype": "BYTES", "shape": [N], "data":
[base64 of a serialized tf.Example, ...], "parameters": {"content_type": "base64"}}`` and answers
one output per FP32 ``serving_default`` output. A model without a transform graph takes its own
named inputs (numeric datatypes, data flat or nested, shape batch-first). Anything malformed is
an ``MLServerError`` with a 4xx status and a one-line message; the server keeps serving.
Every answer's ``Server-Timing`` header splits the request into its stages (``STAGE_*`` below).

Which thread runs the engine: a request of at most ``inline_max_rows`` rows (``ServeOptions``,
default ``DEFAULT_INLINE_MAX_ROWS`` = 8) runs its transform + engine call on the event-loop
thread itself, when the model's engine is free; a larger one, or one finding the engine busy,
goes to the default thread pool (``loop.run_in_executor``) and waits there, never on the loop.
One engine call at a time per model either way (``_engine_lock``). Why: ONNX Runtime's and
OpenVINO's own worker threads already fill the cores, so the pool thread was a third runnable
thread plus a hop each way (``queue`` ~0.08 ms, and the loop's wake-up after it); a batch-1
MobileNetV2 answer (2-core EPYC, concurrency 1, interleaved A/B of two servers) took ~0.1-0.4 ms
less inline (``queue`` 0.08 -> 0.003 ms, app minus stages ~0.5 -> ~0.4 ms), throughput at
concurrency 8 unchanged within noise. The cost: while a small request computes (~2-15 ms here)
the loop answers nothing else, health checks included; large batches keep the pool so that
this stays short. ``inline_max_rows=0`` restores "always the pool".
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from time import perf_counter
from typing import Any, Mapping, Optional

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.codecs.numpy import _encode_data, to_datatype
from mlserver.codecs.utils import inject_batch_dimension
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, Parameters

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
#: Requests of at most this many rows run their engine call on the event-loop thread itself
#: (``NanoTfxRuntime.predict``); larger ones in the default thread pool. 0: always the pool.
DEFAULT_INLINE_MAX_ROWS = 8

#: The per-stage split of a request, in the response's ``Server-Timing`` header (W3C Server
#: Timing: ``name;dur=milliseconds``, comma-separated), one entry per stage, in this order:
STAGE_DECODE = "decode"  # the parsed V2 request's inputs -> numpy (base64 decode, checks)
STAGE_QUEUE = "queue"  # the hop to the pool thread + waiting for the engine lock (~0 when run inline)
# ... then the Servable's own stages (servable.STAGE_*: "transform" + "engine", or "model") ...
STAGE_ENCODE = "encode"  # numpy outputs -> the V2 InferenceResponse object
# ... and, added by server.RequestTimer in front of the whole app, "app": from the request's
# headers being parsed to the response being rendered (body read, JSON + pydantic request
# parsing, MLServer's data plane, the stages above, JSON rendering, gzip if asked for).
# Timed on every request (two perf_counter reads a stage); an error answer carries "app" only.
SERVER_TIMING = "Server-Timing"


def server_timing(timings: Mapping[str, float]) -> str:
    """``{"decode": 0.1, ...}`` -> ``decode;dur=0.100, ...`` (the header's value)."""
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in timings.items())


def parse_server_timing(value: str) -> dict[str, float]:
    """A ``Server-Timing`` header value -> ``{name: milliseconds}`` (entries without dur skipped)."""
    out: dict[str, float] = {}
    for entry in (value or "").split(","):
        name, *params = [p.strip() for p in entry.split(";")]
        for p in params:
            if p.startswith("dur="):
                try:
                    out[name] = out.get(name, 0.0) + float(p[4:])
                except ValueError:
                    pass
    return out


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


def decode_values(name: str, datatype: str, shape: list, data: Any, content_type: Any, spec: Any,
                  max_batch: int) -> np.ndarray:
    """One V2 request input, as its fields -> a numpy array of the model's dtype, checked against
    ``spec``. Shared by MLServer's route (pydantic objects) and the direct one (plain JSON)."""
    want = _v2_datatype(spec.dtype)
    if datatype != want:
        raise BadRequest(f"{name}: expected datatype {want}, got {datatype}")
    if not shape or shape[0] < 1:
        raise BadRequest(f"{name}: expected a non-empty batch (shape [N, ...] with N >= 1), got shape {shape}")
    if shape[0] > max_batch:
        raise BadRequest(f"{name}: batch of {shape[0]} exceeds the server's --max-batch-size {max_batch}", 413)
    if datatype == "BYTES":
        if len(shape) != 1:
            raise BadRequest(f"{name}: expected shape [N] (one serialized tf.Example per row), got {shape}")
        flat = data if isinstance(data, list) else [data]
        array = _decode_bytes(name, flat, content_type)
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
        inline = extra.get("inline_max_rows")
        self._inline_max_rows = DEFAULT_INLINE_MAX_ROWS if inline is None else int(inline)
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

    def _decode(self, inputs: list) -> dict:
        """``inputs``: (name, datatype, shape, data, content_type) per request input."""
        names = [i[0] for i in inputs]
        expected = sorted(self._specs)
        if sorted(names) != expected:
            raise BadRequest(f"inputs: expected {expected}, got {names}")
        arrays = {i[0]: decode_values(*i, self._specs[i[0]], self._max_batch) for i in inputs}
        rows = {len(a) for a in arrays.values()}
        if len(rows) != 1:
            raise BadRequest(f"inputs: every input needs the same batch size, got {sorted(rows)}")
        return arrays

    def _predict_locked(self, arrays: dict, timings: dict, submitted: float) -> dict:
        with self._engine_lock:
            timings[STAGE_QUEUE] = (perf_counter() - submitted) * 1000.0
            return self._servable.predict(arrays, timings)

    def _predict_inline(self, arrays: dict, timings: dict, submitted: float) -> Optional[dict]:
        """Run on the calling (event-loop) thread if the model's engine is free right now;
        None if it is busy (a pool thread has it), without waiting for it."""
        if not self._engine_lock.acquire(blocking=False):
            return None
        try:
            timings[STAGE_QUEUE] = (perf_counter() - submitted) * 1000.0
            return self._servable.predict(arrays, timings)
        finally:
            self._engine_lock.release()

    async def _run(self, inputs: list, timings: dict) -> dict:
        """Decode, then transform + engine (inline or in the pool, see the module doc)."""
        t0 = perf_counter()
        arrays = self._decode(inputs)
        t1 = perf_counter()
        timings[STAGE_DECODE] = (t1 - t0) * 1000.0
        rows = len(next(iter(arrays.values())))
        try:
            outputs = None
            if rows <= self._inline_max_rows:  # small: no thread hop (see the module doc)
                outputs = self._predict_inline(arrays, timings, t1)
            if outputs is None:
                # Large, or the engine busy: off the event loop, so health checks and other
                # requests are still answered (the engines release the GIL while computing).
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(None, self._predict_locked, arrays, timings, t1)
        except RequestError as err:
            raise BadRequest(str(err)) from err
        return outputs

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        timings: dict = {}
        outputs = await self._run([(i.name, i.datatype, list(i.shape), i.data.__root__,
                                    getattr(i.parameters, "content_type", None)) for i in payload.inputs], timings)
        t2 = perf_counter()
        response = InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, np.ascontiguousarray(value)) for name, value in outputs.items()],
        )
        timings[STAGE_ENCODE] = (perf_counter() - t2) * 1000.0
        # MLServer turns parameters.headers into HTTP response headers (and drops them from the body)
        response.parameters = Parameters(headers={SERVER_TIMING: server_timing(timings)})
        return response

    async def predict_plain(self, inputs: list, request_id: str) -> tuple[dict, dict]:
        """``predict`` for the server's direct route (``server.DirectInfer``): the request's inputs
        as (name, datatype, shape, data, content_type) from its JSON, the answer as the body MLServer
        renders for ``predict``'s response (same keys, order and numbers) plus the ``Server-Timing``
        stage split. No pydantic object either way (~0.1 ms a request)."""
        timings: dict = {}
        outputs = await self._run(inputs, timings)
        t2 = perf_counter()
        content: dict = {"model_name": self.name}
        if self.version is not None:
            content["model_version"] = self.version
        content["id"] = request_id
        content["parameters"] = {}  # what MLServer leaves of parameters once it took the headers out
        content["outputs"] = [plain_output(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
        timings[STAGE_ENCODE] = (perf_counter() - t2) * 1000.0
        return content, timings


def plain_output(name: str, value: np.ndarray) -> dict:
    """``NumpyCodec.encode_output(name, value)`` as the dict MLServer renders of it."""
    datatype = to_datatype(value.dtype)
    return {"name": name, "shape": inject_batch_dimension(list(value.shape)), "datatype": datatype,
            "parameters": {"content_type": NumpyCodec.ContentType}, "data": _encode_data(value, datatype)}
