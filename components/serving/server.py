"""Run MLServer (REST, V2 Open Inference Protocol) on one or more model folders, in the foreground.

Differences from ``mlserver start``, each for a reason:
* models load *before* the HTTP server listens, so ``GET /v2/health/ready`` is 200 only once
  every model is loaded (MLServer answers 200 while its registry is still empty);
* a request body limit (413) in front of the app: an oversized request is refused before it
  is buffered and parsed, not an out-of-memory crash;
* no gRPC, metrics or Kafka listeners: one port, the one asked for;
* SIGTERM/SIGINT stop the HTTP server cleanly and the process exits 0;
* the infer routes answer without FastAPI's response-model pass (``fast_infer_routes``: ~1.7 ms
  per image-classifier answer), responses are gzipped at level 1 not 9 (``GZIP_LEVEL``), and
  every response carries a ``Server-Timing`` header: the runtime's stages (``decode``, ``queue``,
  ``transform``, ``engine`` or ``model``, ``encode``; see ``runtime``) and ``app``, the whole app
  (``RequestTimer``). ``app`` minus the stages is MLServer/FastAPI/Starlette; a client's latency
  minus ``app`` is HTTP and the client.

Threads (two cores were the design case): TensorFlow, which parses and transforms the requests,
gets one intra-op and one inter-op thread (``ServeOptions.tf_threads``, see
``servable.configure_tensorflow`` for the measurements); the engine keeps its own defaults (one
thread per core, ONNX Runtime's spinning on, OpenVINO's LATENCY hint), the settings
``nano_tfx.quantize`` timed the engines with when ``accelerator='auto'`` chose one, unless
``--threads`` says otherwise. One engine call at a time per model (``runtime``): small requests
(``ServeOptions.inline_max_rows``, 8 rows) on the event-loop thread, larger ones in a worker
thread (see ``runtime`` for why and what it costs); MLServer runs in this process
(``parallel_workers=0``: no worker pool, no inter-process copy of each request).

Event loop: uvloop when it imports (``ServeOptions.event_loop='auto'``; MLServer depends on it
and ``mlserver start`` installs it too, but a bare ``asyncio.run`` as before got the stdlib
loop): ~0.05 ms less per request (HTTP + framework) in an interleaved A/B on the 2-core EPYC.
HTTP parsing is uvicorn's ``http='auto'``: httptools (in the lock: ~0.2 ms less per request than
the pure-Python h11 it falls back to).

Plain V2 infer requests skip MLServer's FastAPI app altogether (``DirectInfer``: ~0.13 ms less of
framework per request, the same answers); ``ServeOptions.direct_infer=False`` turns that off.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import orjson
from mlserver.cloudevents import CloudEventsTypes
from mlserver.errors import MLServerError
from mlserver.rest.responses import Response
from mlserver.utils import generate_uuid

# (runtime imports MLServer anyway: these cost nothing more at import, and nothing per request)
from components.serving.runtime import (
    DEFAULT_INLINE_MAX_ROWS, DEFAULT_MAX_BATCH, SERVER_TIMING, NanoTfxRuntime, server_timing,
)

STAGE_APP = "app"  # Server-Timing entry of RequestTimer (the whole app, stages included)

logger = logging.getLogger("nano_tfx")

DEFAULT_HOST = "127.0.0.1"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = 8080
    max_batch_size: int = DEFAULT_MAX_BATCH  # rows per request (413 above)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # body size (413 above)
    adaptive_batch_size: int = 0  # MLServer adaptive batching: merge up to N requests ...
    adaptive_batch_time: float = 0.0  # ... waiting at most this many seconds (0: off)
    thread_num: Optional[int] = None  # engine threads; None: the engine's default (what quantize timed)
    tf_threads: Optional[int] = None  # TensorFlow intra-/inter-op threads; None: servable.DEFAULT_TF_THREADS (1)
    extra_models: Mapping[str, str] = field(default_factory=dict)
    inline_max_rows: int = DEFAULT_INLINE_MAX_ROWS  # engine call on the event loop up to N rows (0: never)
    event_loop: str = "auto"  # "uvloop", "asyncio", or "auto": uvloop if importable (see event_loop_name)
    direct_infer: bool = True  # plain infer requests straight to the runtime (DirectInfer); False: MLServer's route

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port: expected 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size: expected >= 1, got {self.max_batch_size}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-size: expected >= 1024 bytes, got {self.max_request_bytes}")
        if self.adaptive_batch_size < 0 or self.adaptive_batch_time < 0:
            raise ValueError("--adaptive-batch-size / --adaptive-batch-time: expected >= 0")
        if self.tf_threads is not None and self.tf_threads < 1:
            raise ValueError(f"--tf-threads: expected >= 1, got {self.tf_threads}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop: expected one of {EVENT_LOOPS}, got {self.event_loop!r}")
        if self.inline_max_rows < 0:
            raise ValueError(f"inline_max_rows: expected >= 0, got {self.inline_max_rows}")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # buffered (bounded) so a chunked body can be refused before it is parsed
        body, size = await read_body(receive, self.limit, scope)
        if body is None:
            return await reject_oversize(send, size, self.limit)
        return await self.app(scope, _replay(body, receive), send)


async def read_body(receive, limit: int, scope) -> tuple[bytes | None, str]:
    """(the whole body, its size) or (None, the size seen) once it is over ``limit`` (declared or
    streamed: the rest is not read)."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None, declared.decode()
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None, f"more than {size}"
        more = message.get("more_body", False)
    return b"".join(chunks), str(size)


async def reject_oversize(send, size: str, limit: int) -> None:
    body = json.dumps({"error": f"request body of {size} bytes exceeds the server's "
                                f"--max-request-size {limit}"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read ``body`` over once, then the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class RequestTimer:
    """ASGI middleware: adds ``app;dur=MS`` to the response's ``Server-Timing`` header (after the
    runtime's per-stage entries, see ``runtime.STAGE_*``): the milliseconds from the request
    reaching the app (its headers parsed) to the response's headers being sent, i.e. after the
    JSON body is rendered. What a client measures above it is HTTP (connection, h11 parsing,
    the socket) and the client itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                app_ms = (time.perf_counter() - started) * 1000.0
                headers, found = [], False
                for key, value in message.get("headers") or []:
                    if key.lower() == b"server-timing":
                        value, found = value + b", " + _app_timing(app_ms), True
                    headers.append((key, value))
                if not found:
                    headers.append((b"server-timing", _app_timing(app_ms)))
                message = dict(message, headers=headers)
            await send(message)

        return await self.app(scope, receive, timed_send)


def _app_timing(ms: float) -> bytes:
    return f"{STAGE_APP};dur={ms:.3f}".encode()


#: gzip level of responses for clients that accept it (MLServer's GZipMiddleware uses Starlette's
#: default, 9: ~0.9 ms per MobileNetV2 answer of 1000 floats here, for 2 % fewer bytes than level 1
#: at ~0.1 ms)
GZIP_LEVEL = 1
GZIP_MIN_SIZE = 500  # bytes: smaller answers go out uncompressed


def fast_infer_routes(data_plane) -> list:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` without FastAPI's response model.

    MLServer's own endpoint returns the ``InferenceResponse`` object and FastAPI then validates
    it again against the response model and walks it with ``jsonable_encoder`` before rendering:
    ~1.7 ms for the 1000 floats of an image classifier, more than the INT8 engine's ~2 ms. Here
    the same data plane (``DataPlane.infer``: model registry, MLServer's inference middlewares,
    adaptive batching, metrics) answers, the request is validated by the same pydantic model
    (``InferenceRequest``; malformed JSON or a non-V2 body is the same 422 as FastAPI's), errors
    go to MLServer's exception handlers, and the response is rendered by MLServer's own
    (orjson) ``Response`` from the response object's fields, unset/None fields left out as
    MLServer's routes do.
    """
    from fastapi.exceptions import RequestValidationError
    from mlserver.types import InferenceRequest
    from mlserver.utils import extract_headers, insert_headers
    from pydantic import ValidationError
    from pydantic.error_wrappers import ErrorWrapper
    from starlette.routing import Route

    async def infer(request):
        body = await request.body()
        try:
            obj = orjson.loads(body) if body else None
        except orjson.JSONDecodeError as err:
            raise RequestValidationError([ErrorWrapper(err, ("body", err.pos))], body=err.doc) from err
        try:
            payload = InferenceRequest.parse_obj(obj)
        except ValidationError as err:
            raise RequestValidationError([ErrorWrapper(err, ("body",))], body=obj) from err
        insert_headers(payload, dict(request.headers))
        params = request.path_params
        response = await data_plane.infer(payload, params["model_name"], params.get("model_version"))
        headers = extract_headers(response)
        return Response(content=response_content(response), headers=headers)

    return [Route("/v2/models/{model_name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{model_name}/versions/{model_version}/infer", infer, methods=["POST"])]


def response_content(response) -> dict:
    """``response.dict(exclude_unset=True, exclude_none=True)`` (what MLServer's routes send),
    except that each output's ``data`` list is passed through instead of copied element by
    element (pydantic's ``dict()`` copies lists: ~0.3 ms for 1000 floats)."""
    opts = dict(exclude_unset=True, exclude_none=True)
    content = response.dict(exclude={"outputs"}, **opts)
    content["outputs"] = [dict(o.dict(exclude={"data"}, **opts), data=o.data.__root__) for o in response.outputs]
    return content


def _fast_app(app, data_plane, options: "ServeOptions") -> None:
    """MLServer's FastAPI app with ``fast_infer_routes`` in front of its own infer routes, gzip
    at ``GZIP_LEVEL``, the body limit and the request timer (outermost)."""
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    app.router.routes[:0] = fast_infer_routes(data_plane)
    app.user_middleware[:] = [Middleware(GZipMiddleware, minimum_size=GZIP_MIN_SIZE, compresslevel=GZIP_LEVEL)
                              if m.cls is GZipMiddleware else m for m in app.user_middleware]
    app.add_middleware(BodyLimit, limit=options.max_request_bytes)  # rebuilds the middleware stack
    app.add_middleware(RequestTimer)  # outermost: body reading included


_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
_PLAIN_REQUEST_KEYS = frozenset({"id", "inputs"})
_PLAIN_INPUT_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})


def plain_inputs(obj) -> list | None:
    """A V2 request body (parsed JSON) -> (name, datatype, shape, data, content_type) per input,
    or None when it is anything but the plain form the direct route answers (extra fields,
    requested outputs, parameters other than ``content_type``, wrong types): MLServer's own route
    answers those, with its own validation and error messages."""
    if type(obj) is not dict or not obj.keys() <= _PLAIN_REQUEST_KEYS or not isinstance(obj.get("id", ""), str):
        return None
    inputs = obj.get("inputs")
    if type(inputs) is not list or not inputs:
        return None
    out = []
    for i in inputs:
        if type(i) is not dict or not i.keys() <= _PLAIN_INPUT_KEYS:
            return None
        name, datatype, shape, data = i.get("name"), i.get("datatype"), i.get("shape"), i.get("data")
        params = i.get("parameters") or {}
        if not (type(name) is str and type(datatype) is str and type(shape) is list
                and all(type(d) is int for d in shape) and type(data) is list and type(params) is dict
                and params.keys() <= {"content_type"}):
            return None
        out.append((name, datatype, shape, data, params.get("content_type")))
    return out


class DirectInfer:
    """ASGI, outermost: a plain V2 infer request (``plain_inputs``) for a nano-tfx model without
    adaptive batching goes straight to its runtime (``NanoTfxRuntime.predict_plain``); everything
    else — other routes, other request forms, unknown models, adaptive batching — goes to
    MLServer's app unchanged (the body replayed). Why: Starlette's middleware
    stack and routing, pydantic request and response objects and the data plane's bookkeeping
    cost ~0.3 ms of a ~4 ms INT8 image request (2-core EPYC); this path keeps what a client sees
    the same: the body MLServer renders (same JSON), its CloudEvents headers, its error answers
    (``{"error": ...}`` with the runtime's status code), the request id (a uuid when none is
    given), the body limit, gzip at ``GZIP_LEVEL`` for clients that accept it, and a
    ``Server-Timing`` header ending in ``app``. Metrics are not
    counted on this path (``serve`` runs MLServer without a metrics endpoint).
    """

    def __init__(self, app, registry, data_plane, limit: int):
        self.app, self.registry, self.limit = app, registry, limit
        self.events = data_plane._inference_middleware._middlewares[0]  # MLServer's CloudEvents middleware

    async def __call__(self, scope, receive, send):
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        body, size = await read_body(receive, self.limit, scope)
        if body is None:
            return await reject_oversize(send, size, self.limit)
        plain = await self._plain_request(body, match)
        if plain is None:
            return await self.app(scope, _replay(body, receive), send)
        model, inputs, request_id = plain
        try:
            content, timings = await model.predict_plain(inputs, request_id)
            status, headers = 200, self._event_headers(model, request_id)
        except MLServerError as err:  # the runtime's 4xx, answered as MLServer's handler does
            content, timings, status, headers = {"error": str(err)}, {}, err.status_code, {}
        await self._answer(send, status, content, headers, timings, started, _accepts_gzip(scope))

    async def _plain_request(self, body: bytes, match):
        """(model, inputs, request id) when this route answers the request, else None."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        inputs = plain_inputs(obj)
        if inputs is None:
            return None
        try:
            model = await self.registry.get_model(match["name"], match["version"])
        except Exception:  # noqa: BLE001 - unknown model/version: MLServer's route answers 404
            return None
        if not isinstance(model, NanoTfxRuntime) or not model.ready or (model.settings.max_batch_size or 0) > 1:
            return None
        return model, inputs, obj.get("id") or generate_uuid()

    def _event_headers(self, model, request_id: str) -> dict:
        return self.events._get_headers(CloudEventsTypes.Response, model.settings, request_id)

    @staticmethod
    async def _answer(send, status: int, content: dict, headers: dict, timings: dict, started: float,
                      gzip_ok: bool) -> None:
        body = Response(content=content).body
        raw = [(b"content-type", b"application/json")]
        if gzip_ok and len(body) >= GZIP_MIN_SIZE:  # as the app's GZipMiddleware would
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            raw += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
        timings[STAGE_APP] = (time.perf_counter() - started) * 1000.0
        raw.append((b"content-length", str(len(body)).encode()))
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((SERVER_TIMING.lower().encode(), server_timing(timings).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _accepts_gzip(scope) -> bool:
    for key, value in scope.get("headers") or []:
        if key == b"accept-encoding" and b"gzip" in value:
            return True
    return False


def model_settings(name: str, path: str, options: ServeOptions):
    from mlserver.settings import ModelParameters, ModelSettings

    from components.serving.runtime import NanoTfxRuntime

    return ModelSettings(
        name=name, implementation=NanoTfxRuntime,
        parameters=ModelParameters(uri=path, extra={"max_batch": options.max_batch_size,
                                                    "thread_num": options.thread_num,
                                                    "inline_max_rows": options.inline_max_rows}),
        max_batch_size=options.adaptive_batch_size, max_batch_time=options.adaptive_batch_time,
    )


async def _serve(models: Mapping[str, str], options: ServeOptions) -> None:
    from mlserver import MLServer
    from mlserver.rest import RESTServer
    from mlserver.settings import Settings

    class _Server(MLServer):
        def _add_signal_handlers(self) -> None:  # ours, below: a stop before the REST server exists
            pass

        def _create_servers(self) -> None:
            registry, data_plane = self._model_registry, self._data_plane

            class _REST(RESTServer):
                def _get_config(self):  # uvicorn serves DirectInfer in front of MLServer's app
                    config = super()._get_config()
                    if options.direct_infer:
                        config.app = DirectInfer(config.app, registry, data_plane, options.max_request_bytes)
                    return config

            self._rest_server = _REST(self._settings, self._data_plane, self._model_repository_handlers)
            _fast_app(self._rest_server._app, self._data_plane, options)
            self._grpc_server = self._kafka_server = None

    from components.serving.servable import DEFAULT_TF_THREADS, configure_tensorflow

    configure_tensorflow(options.tf_threads or DEFAULT_TF_THREADS)  # before the first model loads (see its doc)
    settings = Settings(host=options.host, http_port=options.port, parallel_workers=0, metrics_endpoint=None,
                        debug=False, load_models_at_startup=False, model_repository_root="/nonexistent")
    server = _Server(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)

    async def load_all() -> None:
        for name, path in models.items():  # one at a time: peak memory of one load
            await server._model_registry.load(model_settings(name, path, options))

    loading = asyncio.ensure_future(load_all())
    stop_wait = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if stopping.is_set():
        loading.cancel()
        logger.info("stopped while loading")
        return
    loading.result()  # a model that failed to load ends the command with its error
    rest = asyncio.ensure_future(server._rest_server.start())
    logger.info("serving %s on http://%s:%d (V2 REST)", sorted(models), options.host, options.port)
    await asyncio.wait({rest, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not rest.done():
        await server._rest_server.stop(signal.SIGTERM)
        await rest
    else:
        stop_wait.cancel()
        rest.result()  # uvicorn exits 1 itself when it cannot listen (port taken)
    for name in models:
        try:
            await server._model_registry.unload(name)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass


def event_loop_name(choice: str = "auto") -> str:
    """The event loop ``serve`` runs on: ``choice``, with "auto" -> "uvloop" when it imports
    (MLServer depends on it and ``mlserver start`` installs it too), else "asyncio"."""
    if choice == "auto":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "uvloop"
    return choice


def serve(model_dir: str, name: str, options: ServeOptions) -> None:
    """Serve ``model_dir`` as ``name`` (plus ``options.extra_models``) until SIGTERM/SIGINT."""
    models = {name: model_dir}
    for extra_name, path in options.extra_models.items():
        if extra_name in models:
            raise ValueError(f"--model: name {extra_name!r} given twice")
        models[extra_name] = path
    loop = event_loop_name(options.event_loop)
    logger.info("event loop: %s", loop)
    if loop == "uvloop":
        import uvloop

        uvloop.run(_serve(models, options))
    else:
        asyncio.run(_serve(models, options))
