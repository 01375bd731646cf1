"""Served benchmark: FP32 vs INT8 (each backend and ``auto``) behind one ``nano-tfx serve``.

    .venv/bin/python benchmarks/serve_bench.py [--models mobilenetv2,digits] [--quick] [--out DIR]

Per model it writes the Quantizer's layouts (``Format-Serving/`` via the executor's own writer)
and serves them all, with the FP32 Trainer-style SavedModel, from ONE server process on
localhost (``nano-tfx serve ... --model NAME=DIR``). Every request is the raw request a TFX
model takes: ``examples`` = base64 serialized ``tf.Example``s, one per request.

* ``mobilenetv2``: Keras MobileNetV2 224x224x3 (``weights=None``, BatchNorm statistics
  re-estimated as in ``bench.py``) behind a ``serving_default`` that parses image tf.Examples
  (``image/encoded`` JPEG -> ``decode_jpeg`` -> [-1, 1] in a tf.Transform graph) - the model
  dominates a request;
* ``digits``: the digits pipeline's CNN over its tf.Transform (65 int64 features per example).

Load: a fixed number of requests per (model, variant, concurrency in 1 and 8), sent by a thread
pool (``http.client``, one keep-alive connection per thread), stopping by itself. Per row:
p50/p99 latency (client side, ms), throughput (requests/s = examples/s), and top-1 agreement of
the variant's predictions with the served FP32 model on the same examples; then where a
request's time goes (``split_ms``, medians of the server's ``Server-Timing`` header: decode,
queue, transform, engine or model, encode, app, server_overhead, http); ``c1_interleaved``: the
variants at concurrency 1 taking turns in shuffled rounds, and ``in_process``: the same servable
called directly on the same raw examples, transform included, in a fresh process with the
server's thread settings, each round right after the same served round. ``targets`` checks the
serving targets on those two (served p50 <= in-process p50 + 1 ms; ``auto`` within 5 % of the
fastest served INT8 variant). Output: ``DIR/serve_bench.json`` (schema ``nano-tfx-serve-bench/1``; keys only
added since the first version) and ``DIR/serve_bench.md``; the table, the CPU flags (``lscpu``)
and the target checks are printed.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as _dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

import nano_tfx  # noqa: E402,F401  (first: oneDNN)
import numpy as np  # noqa: E402

from components.quantizer.served_timing import examples_payload as _payload  # noqa: E402
from components.quantizer.served_timing import free_port as _free_port  # noqa: E402

SCHEMA = "nano-tfx-serve-bench/1"
VARIANTS = ("fp32", "inc", "openvino", "onnxruntime", "auto")
PLANS = {"full": dict(requests_c1=200, requests_c8=400, agreement=200, rounds=30, per_slot=10),
         "quick": dict(requests_c1=30, requests_c8=64, agreement=64, rounds=16, per_slot=6)}
IMAGE_KEY = "image/encoded"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[serve-bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> dict:
    """``lscpu``'s model name and the INT8/BF16-relevant flags."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model": fields.get("Model name", "").strip(), "cpus": os.cpu_count(),
            "flags": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                             "amx_int8", "amx_bf16")}}


# -- models -----------------------------------------------------------------------------------
def image_preprocessing_fn(inputs):
    """tf.Transform: JPEG bytes -> float [N, 224, 224, 3] in [-1, 1] (MobileNetV2's scaling)."""
    import tensorflow as tf

    def decode(jpeg):
        img = tf.io.decode_jpeg(jpeg, channels=3)
        return tf.cast(tf.image.resize(img, [224, 224]), tf.float32)

    images = tf.map_fn(decode, tf.reshape(inputs[IMAGE_KEY], [-1]), fn_output_signature=tf.float32)
    return {"image_xf": images / 127.5 - 1.0}


def image_examples(n: int, seed: int = 0) -> list[bytes]:
    """Smooth random JPEG images (noise compresses badly and is not what a camera sends)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, (14, 14, 3)).astype(np.float32)
        img = tf.image.resize(small[None], [224, 224], method="bicubic")[0]
        jpeg = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8), quality=90).numpy()
        feat = tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg]))
        out.append(tf.train.Example(features=tf.train.Features(feature={IMAGE_KEY: feat})).SerializeToString())
    return out


def mobilenet_models(root: str) -> tuple[str, str, list[bytes]]:
    """MobileNetV2 as a TFX Trainer would push it: tf_keras (the Trainer's Keras), one named
    input ``image_xf``; random weights with BatchNorm statistics re-estimated as in bench.py."""
    import tf_keras as keras

    import serve_models

    calib_examples = image_examples(100)
    transform_dir, _ = serve_models.write_transform(root, calib_examples, image_preprocessing_fn)
    keras.utils.set_random_seed(0)
    inp = keras.layers.Input((224, 224, 3), name="image_xf")
    model = keras.applications.MobileNetV2(weights=None, input_tensor=inp, classes=1000)
    calib = serve_models.transformed_inputs_from(transform_dir, calib_examples, ["image_xf"])["image_xf"]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for b in bns:
        b.momentum = 0.0
    model(calib[:32], training=True)
    for b in bns:
        b.momentum = 0.99
    model_dir = serve_models.save_trainer_model(model, transform_dir, None, os.path.join(root, "fp32"))
    return model_dir, transform_dir, calib_examples


def _built(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "fp32", "saved_model.pb")) and os.path.isdir(
        os.path.join(root, "transform_graph", "transform_fn"))


def build_variants(name: str, root: str, variants: list[str]) -> tuple[dict, list[bytes], dict]:
    """({variant: model dir}, eval examples, notes). Reuses what a previous run left in ``root``
    (``--workdir``): the FP32 model + transform graph, and each finished layout."""
    import serve_models

    notes: dict = {}
    reuse = _built(root)
    if name == "mobilenetv2":
        if reuse:
            fp32, transform = os.path.join(root, "fp32"), os.path.join(root, "transform_graph")
            calib_examples = image_examples(100)
        else:
            fp32, transform, calib_examples = mobilenet_models(root)
        eval_examples = image_examples(PLANS["full"]["agreement"], seed=1)
        notes["model"] = ("Keras MobileNetV2 224x224x3, weights=None, BatchNorm statistics re-estimated "
                          "(bench.build_case); JPEG tf.Examples decoded in a tf.Transform graph")
    elif name == "digits":
        if reuse:
            fp32, transform = os.path.join(root, "fp32"), os.path.join(root, "transform_graph")
        else:
            fp32, transform = serve_models.digits_models(root)
        calib_examples = serve_models.quantizer_sample(serve_models.digits_examples("train")[0])
        eval_examples = serve_models.digits_examples("eval", with_label=False)[0]
        notes["model"] = "the digits pipeline's CNN over its tf.Transform graph (65 raw int64 features)"
    else:
        raise ValueError(f"--models: unknown model {name!r}; expected mobilenetv2, digits")
    calib = serve_models.transformed_inputs(fp32, transform, calib_examples)
    dirs = {"fp32": fp32}
    for variant in variants:
        if variant == "fp32":
            continue
        started = time.time()
        accelerator = None if variant == "inc" else variant
        done = os.path.join(root, variant, "quantized_model", "Format-Serving")
        try:
            if os.path.isfile(os.path.join(done, "nano_tfx.json")):
                dirs[variant] = done
            else:
                dirs[variant] = serve_models.write_layout(fp32, transform, calib, accelerator,
                                                          os.path.join(root, variant), raw_examples=calib_examples)
            with open(os.path.join(dirs[variant], "nano_tfx.json")) as f:
                notes[f"{variant}_engine"] = json.load(f).get("backend")
            log(f"{name}/{variant}: quantized + layout written in {time.time() - started:.0f}s")
        except Exception as err:  # noqa: BLE001 - a failed variant is a row, not the end of the run
            notes[f"{variant}_failed"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"{name}/{variant}: FAILED {notes[f'{variant}_failed']}")
    return dirs, eval_examples, notes


# -- server and load --------------------------------------------------------------------------
def start_server(models: dict, log_path: str, threads: int | None, serve_args: tuple = ()) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    names = list(models)
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", models[names[0]], "--name", names[0],
           "--port", str(port)] + [a for n in names[1:] for a in ("--model", f"{n}={models[n]}")]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(serve_args)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready in 900s; see {log_path}")


def predict(session, url: str, model: str, examples: list[bytes]) -> np.ndarray:
    preds = []
    for i in range(0, len(examples), 32):
        r = session.post(f"{url}/v2/models/{model}/infer", data=_payload(examples[i:i + 32]),
                         headers={"content-type": "application/json"}, timeout=600)
        r.raise_for_status()
        out = r.json()["outputs"][0]
        preds.append(np.asarray(out["data"]).reshape(out["shape"]))
    return np.concatenate(preds)


class _Client:
    """One keep-alive HTTP/1.1 connection (``http.client``), reopened when the server closed it.
    ``requests`` costs ~0.5 ms of client-side Python per call on the 2-core EPYC this was tuned
    on; this client measures the server, not the client library."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.conn = parts.hostname, parts.port, None

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        """(status, response headers); -1 when the connection fails twice."""
        import http.client

        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
                self.conn.request("POST", path, body=body, headers={"content-type": "application/json"})
                r = self.conn.getresponse()
                r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return -1, {}


def _median(values: list) -> float | None:
    return round(float(statistics.median(values)), 3) if values else None


def split_ms(samples: list[tuple[float, dict]]) -> dict:
    """Median per-stage milliseconds of ``(client ms, Server-Timing entries)`` samples: the
    runtime's stages (``decode``, ``queue``, ``transform``, ``engine`` or ``model``,
    ``encode``), ``app`` (the server's whole app), ``server_overhead`` (app minus the stages:
    MLServer/FastAPI/Starlette) and ``http`` (client latency minus app: HTTP and the client)."""
    from components.serving.server import STAGE_APP

    stages: dict[str, list] = {}
    overhead, http = [], []
    for ms, timing in samples:
        for name, value in timing.items():
            stages.setdefault(name, []).append(value)
        if STAGE_APP in timing:
            overhead.append(timing[STAGE_APP] - sum(v for k, v in timing.items() if k != STAGE_APP))
            http.append(ms - timing[STAGE_APP])
    out = {name: _median(values) for name, values in stages.items()}
    out["server_overhead"] = _median(overhead)
    out["http"] = _median(http)
    return out


def bounded_load(url: str, model: str, examples: list[bytes], n: int, concurrency: int) -> dict:
    """``n`` single-example requests, ``concurrency`` at a time; stops by itself. Also the
    median per-stage split of the requests (``split_ms``) from their ``Server-Timing`` headers."""
    from components.serving.runtime import SERVER_TIMING, parse_server_timing

    payloads = [_payload([examples[i % len(examples)]]) for i in range(n)]
    local = __import__("threading").local()
    path = f"/v2/models/{model}/infer"

    def send(body: bytes) -> tuple[float, int, dict]:
        if not hasattr(local, "c"):
            local.c = _Client(url)
        t = time.perf_counter()
        code, headers = local.c.post(path, body)  # -1: connection reset / timeout, an error row
        ms = (time.perf_counter() - t) * 1000.0
        return ms, code, parse_server_timing(headers.get(SERVER_TIMING.lower(), ""))

    for body in payloads[:2]:  # warm-up
        send(body)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, payloads))
    wall = time.perf_counter() - started
    lat = sorted(ms for ms, code, _ in results if code == 200)
    errors = sum(1 for _, code, _ in results if code != 200)
    return {"requests": n, "errors": errors, "p50_ms": round(statistics.median(lat), 3) if lat else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if lat else None,
            "throughput_rps": round(len(lat) / wall, 2) if wall > 0 else None,
            "split_ms": split_ms([(ms, t) for ms, code, t in results if code == 200])}


def round_order(names: list, rnd: int) -> list:
    """The variants' order in round ``rnd``: shuffled (seeded, the same in the served and the
    in-process runs), so that no variant always follows the same one (an engine's threads still
    spinning, TensorFlow's pools after the FP32 and INC variants)."""
    order = list(names)
    np.random.default_rng(rnd).shuffle(order)
    return order


def _served_round(client: "_Client", models: dict, examples: list[bytes], rnd: int, per_slot: int,
                  samples: dict) -> None:
    """One interleaved round at concurrency 1: every variant a slot of ``per_slot`` requests (one
    more first, unmeasured), in ``round_order``."""
    from components.serving.runtime import SERVER_TIMING, parse_server_timing

    for variant in round_order(list(models), rnd):
        for i in range(per_slot + 1):
            body = _payload([examples[(rnd * per_slot + i) % len(examples)]])
            t = time.perf_counter()
            code, headers = client.post(f"/v2/models/{models[variant]}/infer", body)
            ms = (time.perf_counter() - t) * 1000.0
            if i and code == 200:
                samples[variant].append((ms, parse_server_timing(headers.get(SERVER_TIMING.lower(), ""))))


class InProcess:
    """The same servables in a fresh process set up as the server is (``configure_tensorflow``
    with the server's TensorFlow threads, the same ``--threads``, every variant loaded side by
    side), called directly on the same raw examples (one per call, transform included), round by
    round in step with the served rounds so that both see the same neighbours' load."""

    def __init__(self, dirs: dict, examples: list[bytes], plan: dict, threads: int | None):
        n = plan["rounds"] * plan["per_slot"] + 1
        with tempfile.NamedTemporaryFile("wb", suffix=".examples", delete=False) as f:
            f.write(json.dumps([base64.b64encode(e).decode() for e in examples[:n]]).encode())
        self.examples_path = f.name
        job = json.dumps({"dirs": dirs, "per_slot": plan["per_slot"], "threads": threads})
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--in-process-job", job, f.name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"in-process worker exited {self.proc.wait()} before {word}")
            if line.startswith(word):
                return line[len(word):].strip()

    def round(self, rnd: int) -> None:
        self.proc.stdin.write(f"ROUND {rnd}\n")
        self.proc.stdin.flush()
        self._expect("OK")

    def finish(self) -> dict:
        try:
            self.proc.stdin.write("DONE\n")
            self.proc.stdin.flush()
            return json.loads(self._expect("IN-PROCESS"))
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if os.path.exists(self.examples_path):
            os.unlink(self.examples_path)


def interleaved(url: str, models: dict, dirs: dict, examples: list[bytes], plan: dict,
                threads: int | None) -> tuple[dict, dict]:
    """({variant: served}, {variant: in-process}), each {"p50_ms", "split_ms", ...}: concurrency
    1, ``plan["rounds"]`` rounds, each giving every variant a slot of ``plan["per_slot"]``
    requests in a shuffled order (``round_order``), so that a noisy neighbour hits every variant
    alike (the sequential ``c1`` rows are minutes apart); after each served round the same round
    runs in-process (``InProcess``; the server idle meanwhile). What the serving targets are
    judged on. The in-process side is {} if its worker failed."""
    client, names = _Client(url), list(models)
    samples: dict = {v: [] for v in names}
    try:
        local = InProcess(dirs, examples, plan, threads)
    except (OSError, RuntimeError) as err:
        log(f"in-process worker failed to start: {err}")
        local = None
    try:
        for rnd in range(plan["rounds"]):
            _served_round(client, models, examples, rnd, plan["per_slot"], samples)
            if local is not None:
                local.round(rnd)
        in_proc = local.finish() if local is not None else {}
    except (OSError, RuntimeError, ValueError) as err:
        log(f"in-process timing failed: {err}")
        in_proc = {}
    finally:
        if local is not None:
            local.close()
    served = {v: {"p50_ms": _median([ms for ms, _ in got]), "split_ms": split_ms(got), "requests": len(got)}
              for v, got in samples.items()}
    return served, in_proc


def _in_process_job(job: str, examples_path: str) -> int:
    """The ``InProcess`` worker: READY once loaded; ``ROUND r`` runs round r (OK after);
    ``DONE`` prints ``IN-PROCESS {json}`` and exits."""
    from components.serving.servable import DEFAULT_TF_THREADS, configure_tensorflow, load_servable

    spec = json.loads(job)
    with open(examples_path) as f:
        examples = [base64.b64decode(e) for e in json.load(f)]
    configure_tensorflow(DEFAULT_TF_THREADS)  # first TensorFlow use of this process: the server's settings
    servables = {v: load_servable(d, thread_num=spec["threads"]) for v, d in spec["dirs"].items()}
    per_slot, names = spec["per_slot"], list(servables)
    lat: dict = {v: [] for v in names}
    stages: dict = {v: {} for v in names}
    print("READY", flush=True)
    for line in sys.stdin:
        if line.startswith("DONE"):
            break
        rnd = int(line.split()[1])
        for variant in round_order(names, rnd):  # as _served_round
            for i in range(per_slot + 1):
                x = {"examples": np.array([examples[(rnd * per_slot + i) % len(examples)]], dtype=object)}
                timings: dict = {}
                t = time.perf_counter()
                servables[variant].predict(x, timings)
                if i:
                    lat[variant].append((time.perf_counter() - t) * 1000.0)
                    for k, v in timings.items():
                        stages[variant].setdefault(k, []).append(v)
        print("OK", flush=True)
    out = {v: {"p50_ms": _median(lat[v]), "split_ms": {k: _median(x) for k, x in stages[v].items()},
               "calls": len(lat[v])} for v in names}
    print("IN-PROCESS " + json.dumps(out), flush=True)
    return 0


def run_model(name: str, variants: list[str], plan: dict, tmp: str, threads: int | None, skip: set,
              serve_args: tuple = ()) -> dict:
    import requests

    root = os.path.join(tmp, name)
    os.makedirs(root, exist_ok=True)
    skipped = [v for v in variants if f"{name}:{v}" in skip and v != "fp32"]
    dirs, examples, notes = build_variants(name, root, [v for v in variants if v not in skipped])
    for v in skipped:
        notes[f"{v}_failed"] = "skipped (--skip)"
    served = {f"{name}_{v}": d for v, d in dirs.items()}
    log(f"{name}: starting one server with {sorted(served)}")
    proc, url = start_server(served, os.path.join(root, "server.log"), threads, serve_args)
    rows, local = [], {}
    try:
        session = requests.Session()
        agree_set = examples[:plan["agreement"]]
        fp32_pred = predict(session, url, f"{name}_fp32", agree_set).argmax(-1)
        for variant in variants:
            if variant not in dirs:
                rows.append({"model": name, "variant": variant, "status": notes.get(f"{variant}_failed", "not built")})
                continue
            model = f"{name}_{variant}"
            pred = fp32_pred if variant == "fp32" else predict(session, url, model, agree_set).argmax(-1)
            row = {"model": name, "variant": variant, "status": "ok",
                   "engine": notes.get(f"{variant}_engine", "tensorflow" if variant == "fp32" else None),
                   "top1_agreement_vs_fp32": round(float(np.mean(pred == fp32_pred)), 4)}
            for c, n in ((1, plan["requests_c1"]), (8, plan["requests_c8"])):
                log(f"{model}: {n} requests at concurrency {c}")
                row[f"c{c}"] = bounded_load(url, model, examples, n, c)
            rows.append(row)
        ok = {r["variant"]: f"{name}_{r['variant']}" for r in rows if r["status"] == "ok"}
        log(f"{name}: {plan['rounds']} interleaved rounds of {plan['per_slot']} requests per variant at "
            "concurrency 1, each round served then in-process")
        served_c1, local = interleaved(url, ok, {v: dirs[v] for v in ok}, examples, plan, threads)
        for variant, got in served_c1.items():
            next(r for r in rows if r["variant"] == variant)["c1_interleaved"] = got
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    fp32 = next((r for r in rows if r["variant"] == "fp32" and r["status"] == "ok"), None)
    for r in rows:
        if fp32 and r["status"] == "ok":
            for c in ("c1", "c8"):
                a, b = r[c]["throughput_rps"], fp32[c]["throughput_rps"]
                r[c]["speedup_vs_fp32"] = round(a / b, 2) if a and b else None
        if r["status"] == "ok" and r["variant"] in local:
            r["in_process"] = local[r["variant"]]
            p50, served = r["in_process"]["p50_ms"], (r.get("c1_interleaved") or {}).get("p50_ms")
            r["served_minus_in_process_ms"] = round(served - p50, 3) if p50 and served else None
    return {"model": name, "rows": rows, "notes": notes, "server_exit_code": code, "targets": targets(rows)}


def targets(rows: list[dict]) -> dict:
    """The issue's two serving targets on this run, on the interleaved concurrency-1 p50s
    (``c1_interleaved``): served within 1 ms of the same servable in-process, per variant;
    ``auto`` within 5 % of the fastest served INT8 variant."""
    ok = [r for r in rows if r["status"] == "ok" and (r.get("c1_interleaved") or {}).get("p50_ms")]
    out: dict = {"served_le_in_process_plus_1ms": {
        r["variant"]: r.get("served_minus_in_process_ms") is not None and r["served_minus_in_process_ms"] <= 1.0
        for r in ok}}
    int8 = [r for r in ok if r["variant"] != "fp32"]
    auto = next((r for r in int8 if r["variant"] == "auto"), None)
    if auto and int8:
        p50 = {r["variant"]: r["c1_interleaved"]["p50_ms"] for r in int8}
        fastest = min(p50, key=p50.get)
        ratio = p50["auto"] / p50[fastest]
        out["auto_vs_fastest"] = {"auto_engine": auto.get("engine"), "fastest": fastest,
                                  "auto_p50_ms": p50["auto"], "fastest_p50_ms": p50[fastest],
                                  "ratio": round(ratio, 4), "within_5pct": ratio <= 1.05}
    return out


def table(results: list[dict]) -> str:
    head = ("| model | variant | engine | agreement | c1 p50 ms | c1 p99 ms | c1 req/s | c1 x FP32 "
            "| c8 p50 ms | c8 p99 ms | c8 req/s | c8 x FP32 "
            "| c1 interleaved p50 ms | in-process p50 ms | c1 transform ms | c1 engine ms | c1 decode+encode ms "
            "| c1 server ms | c1 http ms |")
    lines = [head, "|" + "---|" * 19]
    for res in results:
        for r in res["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {r['variant']} | {r['status']} |" + " |" * 16)
                continue
            c1, c8 = r["c1"], r["c8"]
            sp = c1.get("split_ms") or {}
            engine = sp.get("engine") if sp.get("engine") is not None else sp.get("model")
            codec = (round(sp.get("decode", 0) + sp.get("encode", 0), 3)
                     if sp.get("decode") is not None else None)
            server = (round(sp["server_overhead"] + sp.get("queue", 0), 3)
                      if sp.get("server_overhead") is not None else None)
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['engine']} | {r['top1_agreement_vs_fp32']:.4f} "
                f"| {c1['p50_ms']} | {c1['p99_ms']} | {c1['throughput_rps']} | {c1.get('speedup_vs_fp32')} "
                f"| {c8['p50_ms']} | {c8['p99_ms']} | {c8['throughput_rps']} | {c8.get('speedup_vs_fp32')} "
                f"| {(r.get('c1_interleaved') or {}).get('p50_ms')} | {(r.get('in_process') or {}).get('p50_ms')} "
                f"| {sp.get('transform', '-' if engine is not None else None)} "
                f"| {engine} | {codec} | {server} | {sp.get('http')} |")
    return "\n".join(lines)


def targets_text(results: list[dict]) -> str:
    lines = []
    for res in results:
        t = res.get("targets") or {}
        near = t.get("served_le_in_process_plus_1ms") or {}
        gaps = {r["variant"]: r.get("served_minus_in_process_ms") for r in res["rows"] if r["status"] == "ok"}
        if near:
            lines.append(f"{res['model']}: served p50 minus in-process p50, interleaved, concurrency 1 (ms): "
                         + ", ".join(f"{v} {gaps.get(v)} ({'<= 1 ms' if ok else '> 1 ms'})" for v, ok in near.items()))
        a = t.get("auto_vs_fastest")
        if a:
            lines.append(f"{res['model']}: auto ({a['auto_engine']}) c1 p50 {a['auto_p50_ms']} ms vs fastest served "
                         f"INT8 variant {a['fastest']} {a['fastest_p50_ms']} ms: x{a['ratio']} "
                         f"({'within' if a['within_5pct'] else 'NOT within'} 5 %)")
    return "\n".join(lines)


SPLIT_NOTE = (
    "Split of a concurrency-1 request (medians, from the server's Server-Timing header): transform = "
    "parse + tf.Transform in TensorFlow ('-': inside the FP32 SavedModel's one TensorFlow call, counted "
    "under engine); engine = the model's engine; decode+encode = V2 JSON tensors <-> numpy; server = "
    "MLServer/FastAPI/Starlette (request parsing, data plane, response rendering, worker-thread hop); "
    "http = client latency minus the server's app time. c1 interleaved = concurrency 1, the variants "
    "taking turns in rounds (what the targets use); in-process = the same servable called directly on the "
    "same raw examples (transform included), in a fresh process with the server's thread settings, each "
    "round right after the same served round (the server idle meanwhile).")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--in-process-job":
        return _in_process_job(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,digits")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="fp32 is always served")
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run; noisier numbers)")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (nano-tfx serve --threads)")
    ap.add_argument("--serve-args", default="", help="more nano-tfx serve arguments, e.g. '--no-direct-infer'")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--skip", default="", help="MODEL:VARIANT pairs not to build, e.g. mobilenetv2:auto")
    ap.add_argument("--workdir", default=None,
                    help="keep the built models here and reuse them on the next run (default: a temp dir)")
    args = ap.parse_args(argv)
    skip = {p for p in args.skip.split(",") if p}
    variants = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected {list(VARIANTS)}")
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("nano_tfx").setLevel(logging.INFO)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    env = {"cpu": cpu_flags(), "loadavg_start": os.getloadavg(), "python": sys.version.split()[0]}
    results = []
    with tempfile.TemporaryDirectory(prefix="nano_tfx_serve_bench_") as tmp:
        work = args.workdir or tmp
        for name in [m for m in args.models.split(",") if m]:
            results.append(run_model(name, variants, plan, work, args.threads, skip, tuple(args.serve_args.split())))
    env["loadavg_end"] = os.getloadavg()
    doc = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "mode": mode, "plan": plan, "env": env, "results": results,
           "client": "http.client, one keep-alive connection per load thread"}
    os.makedirs(args.out, exist_ok=True)
    md = table(results)
    cpu = env["cpu"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    footer = (f"CPU: {cpu['model']} ({cpu['cpus']} cpus); lscpu flags: {flags}; load avg start "
              f"{tuple(round(x, 2) for x in env['loadavg_start'])} end {tuple(round(x, 2) for x in env['loadavg_end'])}; "
              f"mode {mode}: {plan['requests_c1']} requests at concurrency 1, {plan['requests_c8']} at 8, "
              "one example per request")
    with open(os.path.join(args.out, "serve_bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    checks = targets_text(results)
    with open(os.path.join(args.out, "serve_bench.md"), "w") as f:
        f.write(md + "\n\n" + footer + "\n\n" + SPLIT_NOTE + "\n" + (f"\n{checks}\n" if checks else ""))
    print(md)
    print()
    print(footer)
    print()
    print(SPLIT_NOTE)
    if checks:
        print()
        print(checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
