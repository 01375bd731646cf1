"""How a served model is called, for ``accelerator='auto'`` / ``precision='auto'`` to choose by.

``nano-tfx serve`` answers a raw tf.Example request by parsing it and running the tf.Transform
graph in TensorFlow, then the engine (``components.serving.servable``), then encoding the answer
over HTTP. Two engines within a few percent model-only can swap places there: between two engine
calls the server runs the transform and its HTTP work, so an engine whose worker threads
spin-wait between calls (ONNX Runtime) stays warm, one whose threads go to sleep (OpenVINO) pays
a wake-up per request. Measured with ``benchmarks/serve_bench.py`` (MobileNetV2, 2-core EPYC):
OpenVINO 1-3 % ahead model-only, ONNX Runtime 7-8 % ahead served, every run. Timing the served
call path in the quantizing process was not enough (OpenVINO 1.3 % ahead: TensorFlow's thread
pools there are not the server's, and cannot be shrunk once TensorFlow has run), nor in a fresh
process configured like the server but calling the servable back to back (a tie): the HTTP work
between engine calls is part of what orders them.

So ``ServedCallPath.time_side_by_side`` times the finalists *served*: each is saved as the
Quantizer's serving layout (model + ``transform_graph/`` + the raw keys), one ``nano-tfx serve``
process (the server's own defaults: TensorFlow 1/1 threads, the engines' default threads) serves
them all on localhost, and this process sends raw-example requests at concurrency 1, the
finalists taking turns in rounds; the median latency per finalist decides. If the server cannot
start (no MLServer, no free port), the call path is timed in this process instead, with a note.
"""
from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("nano_tfx")

#: raw examples kept for timing (one per call at batch 1; JPEG-sized records stay small)
TIMING_EXAMPLES = 16


def read_raw_examples(file_pattern: str, limit: int = TIMING_EXAMPLES) -> list[bytes]:
    """The first ``limit`` serialized records of a split (ExampleGen writes GZIP TFRecords)."""
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise ValueError(f"raw_examples: no files match {file_pattern!r}")
    compression = "GZIP" if files[0].endswith(".gz") else ""
    out: list[bytes] = []
    for record in tf.data.TFRecordDataset(files, compression_type=compression).take(limit):
        out.append(record.numpy())
    if not out:
        raise ValueError(f"raw_examples: the split at {file_pattern!r} has no records")
    return out


class ServedCallPath:
    """A ``call_path`` for ``nano_tfx.quantize``: raw examples -> parse + tf.Transform (as
    ``nano-tfx serve`` runs them) -> the candidate.

    Called with a model, it returns the in-process served call (each call takes as many raw
    examples as the timed batch has rows, rotating through ``examples``).
    ``time_side_by_side`` times finalists the way ``nano_tfx.quantize`` asks for
    (``nano_tfx.speed.CallPath``): behind a ``nano-tfx serve`` process (``isolated``, the
    default), else through ``self`` here. ``notes`` records which, for the report.
    """

    def __init__(self, transform_dir: str, raw_keys: Optional[Sequence[str]], examples: Sequence[bytes],
                 tf_threads: Optional[int] = None, isolated: bool = True, notes: Optional[list] = None):
        from components.serving.servable import DEFAULT_TF_THREADS

        if not examples:
            raise ValueError("raw_examples: expected at least one serialized tf.Example to time with")
        self.transform_dir = transform_dir
        self.raw_keys = list(raw_keys) if raw_keys is not None else None
        self.examples = [bytes(e) for e in examples]
        self.tf_threads = DEFAULT_TF_THREADS if tf_threads is None else int(tf_threads)
        self.isolated = isolated
        self.notes: list[str] = notes if notes is not None else []  # e.g. the Quantizer's report notes
        self._transforms: dict = {}  # one tf.function per input layout (every finalist has the same one)
        self._turn = itertools.count()

    def __call__(self, model: Any):
        from components.serving.servable import examples_transform

        layout = tuple((t.name, str(np.dtype(t.dtype))) for t in model.inputs)
        if layout not in self._transforms:
            self._transforms[layout] = examples_transform(self.transform_dir, model.inputs, self.raw_keys,
                                                          argument="raw_examples")
        transform, run, examples, turn = self._transforms[layout], model.run, self.examples, self._turn

        def served(x: Sequence[np.ndarray]) -> Any:
            rows = len(x[0]) if len(x) else 1
            start = next(turn)
            batch = np.array([examples[(start + i) % len(examples)] for i in range(rows)], dtype=object)
            return run(transform(batch))

        return served

    def time_side_by_side(self, models: Mapping[str, Any], budget_s: float) -> dict[str, float]:
        """{name: batch-1 ms} of ``models`` (``QuantizedModel``s) timed side by side as served
        (see the module doc); timed here through ``self`` if no server can run."""
        if self.isolated:
            try:
                ms, requests = _time_served(models, self, budget_s)
                self.notes.append(f"finalists timed as served: one `nano-tfx serve` process (TensorFlow "
                                  f"{self.tf_threads}/{self.tf_threads} threads, the engines' default threads), "
                                  f"raw examples over HTTP at concurrency 1, {requests} requests each, median")
                return ms
            except Exception as err:  # noqa: BLE001 - timing as served is an aid, not a requirement
                text = str(err).strip()
                first = text.splitlines()[-1] if text else type(err).__name__
                log.warning("nano-tfx: timing the finalists behind a server failed (%s); timing them here", first)
                self.notes.append(f"timing the finalists behind a server failed ({first[:200]}); timed through "
                                  f"the served call path in the quantizing process instead")
        return _time_here(models, self, budget_s)


#: seconds the timing server may take to load the finalists (imports, model loads)
SERVER_START_S = 600
#: requests per finalist per round (one more first, unmeasured: after another finalist's turn)
PER_SLOT = 10
MIN_ROUNDS = 5
MAX_ROUNDS = 60


def free_port() -> int:
    """A free TCP port on localhost (for a local ``nano-tfx serve``)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _layout(model: Any, directory: str, call_path: "ServedCallPath") -> None:
    """The Quantizer's serving layout of ``model``: the model, ``transform_graph/`` and the raw keys."""
    from components.quantizer import serving

    model.save(directory)
    try:  # the finalists share one transform graph: a link, not a copy per finalist
        os.symlink(os.path.abspath(call_path.transform_dir), os.path.join(directory, serving.TRANSFORM_DIR))
    except OSError:
        serving.copy_transform_graph(call_path.transform_dir, directory)
    serving.write_serving_manifest(directory, call_path.raw_keys)


def _time_served(models: Mapping[str, Any], call_path: "ServedCallPath", budget_s: float) -> tuple[dict, int]:
    import signal
    import statistics
    import time

    names = list(models)
    with tempfile.TemporaryDirectory(prefix="nano_tfx_served_timing_") as tmp:
        dirs = {}
        for k, name in enumerate(names):
            dirs[f"m{k}"] = os.path.join(tmp, f"m{k}")
            _layout(models[name], dirs[f"m{k}"], call_path)
        port = free_port()
        spec = os.path.join(tmp, "serve.json")
        with open(spec, "w") as f:
            json.dump({"models": dirs, "port": port, "tf_threads": call_path.tf_threads}, f)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "components.quantizer.served_timing", "--serve", spec],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            conn = _wait_ready(proc, port, log_path)
            bodies = [examples_payload([e]) for e in call_path.examples]
            samples: dict = {m: [] for m in dirs}
            rounds, started, turn = 0, time.perf_counter(), 0
            while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - started < budget_s):
                order = list(dirs)[rounds % len(dirs):] + list(dirs)[:rounds % len(dirs)]
                for m in order:
                    for i in range(PER_SLOT + 1):
                        body = bodies[turn % len(bodies)]
                        turn += 1
                        t = time.perf_counter()
                        conn.request("POST", f"/v2/models/{m}/infer", body=body,
                                     headers={"content-type": "application/json"})
                        r = conn.getresponse()
                        answer = r.read()
                        ms = (time.perf_counter() - t) * 1000.0
                        if r.status != 200:
                            raise RuntimeError(f"the timing server answered {r.status}: {answer[:300]!r}")
                        if i:
                            samples[m].append(ms)
                rounds += 1
            conn.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)
    ms = {name: statistics.median(samples[f"m{k}"]) for k, name in enumerate(names)}
    log.info("nano-tfx: finalists as served (%d rounds): p50 ms %s", rounds, {k: round(v, 3) for k, v in ms.items()})
    return ms, rounds * PER_SLOT


def examples_payload(examples: Sequence[bytes]) -> bytes:
    """A V2 infer request body carrying serialized raw tf.Examples (``examples``, base64)."""
    return json.dumps({"inputs": [{"name": "examples", "shape": [len(examples)], "datatype": "BYTES",
                                   "data": [base64.b64encode(e).decode("ascii") for e in examples],
                                   "parameters": {"content_type": "base64"}}]}).encode()


def _wait_ready(proc: subprocess.Popen, port: int, log_path: str):
    import http.client
    import time

    deadline = time.time() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            with open(log_path) as f:
                tail = f.read().strip().splitlines()[-5:]
            raise RuntimeError(f"the timing server exited {proc.returncode}: " + " | ".join(tail))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("GET", "/v2/health/ready")
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                return conn
            conn.close()
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the timing server was not ready after {SERVER_START_S}s")
        time.sleep(0.25)


def _time_here(models: Mapping[str, Any], call_path: "ServedCallPath", budget_s: float) -> dict[str, float]:
    from nano_tfx.speed import side_by_side

    runs = {name: call_path(model) for name, model in models.items()}
    # the served call ignores the array's values: it takes one raw example per row
    return dict(side_by_side(runs, [np.zeros((1, 1), np.float32)], budget_s=budget_s).b1_ms)


def served_call_path(transform_dir: str, raw_keys: Optional[Sequence[str]], examples: Sequence[bytes],
                     isolated: bool = True, notes: Optional[list] = None) -> ServedCallPath:
    """The ``call_path`` the Quantizer chooses its finalists by (``ServedCallPath``)."""
    return ServedCallPath(transform_dir, raw_keys, examples, isolated=isolated, notes=notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The timing server: ``python -m components.quantizer.served_timing --serve SPEC.json`` runs
    ``nano-tfx serve``'s server with its defaults on the spec's models and port."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--serve":
        raise SystemExit("usage: python -m components.quantizer.served_timing --serve SPEC.json")
    with open(args[1]) as f:
        spec = json.load(f)
    import nano_tfx  # noqa: F401  (first: it sets oneDNN's variables before TensorFlow is imported)
    from components.serving.server import ServeOptions, serve

    (first, path), *rest = spec["models"].items()
    serve(path, first, ServeOptions(port=int(spec["port"]), tf_threads=spec["tf_threads"], extra_models=dict(rest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
