"""Run MLServer (REST, V2 Open Inference Protocol) on one or more model folders, in the foreground.

Differences from ``mlserver start``, each for a reason:
* models load *before* the HTTP server listens, so ``GET /v2/health/ready`` is 200 only once
  every model is loaded (MLServer answers 200 while its registry is still empty);
* a request body limit (413) in front of the app: an oversized request is refused before it
  is buffered and parsed, not an out-of-memory crash;
* no gRPC, metrics or Kafka listeners: one port, the one asked for;
* SIGTERM/SIGINT stop the HTTP server cleanly and the process exits 0.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from typing import Mapping, Optional

from components.serving.runtime import DEFAULT_MAX_BATCH

logger = logging.getLogger("nano_tfx")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = 8080
    max_batch_size: int = DEFAULT_MAX_BATCH  # rows per request (413 above)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # body size (413 above)
    adaptive_batch_size: int = 0  # MLServer adaptive batching: merge up to N requests ...
    adaptive_batch_time: float = 0.0  # ... waiting at most this many seconds (0: off)
    thread_num: Optional[int] = None
    extra_models: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port: expected 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size: expected >= 1, got {self.max_batch_size}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-size: expected >= 1024 bytes, got {self.max_request_bytes}")
        if self.adaptive_batch_size < 0 or self.adaptive_batch_time < 0:
            raise ValueError("--adaptive-batch-size / --adaptive-batch-time: expected >= 0")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, send, size: str) -> None:
        body = json.dumps({"error": f"request body of {size} bytes exceeds the server's "
                                    f"--max-request-size {self.limit}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send, declared.decode())
        chunks, size, more = [], 0, True
        while more:  # buffer (bounded) so a chunked body can be refused before it is parsed
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send, f"more than {size}")
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def model_settings(name: str, path: str, options: ServeOptions):
    from mlserver.settings import ModelParameters, ModelSettings

    from components.serving.runtime import NanoTfxRuntime

    return ModelSettings(
        name=name, implementation=NanoTfxRuntime,
        parameters=ModelParameters(uri=path, extra={"max_batch": options.max_batch_size,
                                                    "thread_num": options.thread_num}),
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
            self._rest_server = RESTServer(self._settings, self._data_plane, self._model_repository_handlers)
            self._rest_server._app.add_middleware(BodyLimit, limit=options.max_request_bytes)
            self._grpc_server = self._kafka_server = None

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


def serve(model_dir: str, name: str, options: ServeOptions) -> None:
    """Serve ``model_dir`` as ``name`` (plus ``options.extra_models``) until SIGTERM/SIGINT."""
    models = {name: model_dir}
    for extra_name, path in options.extra_models.items():
        if extra_name in models:
            raise ValueError(f"--model: name {extra_name!r} given twice")
        models[extra_name] = path
    asyncio.run(_serve(models, options))
