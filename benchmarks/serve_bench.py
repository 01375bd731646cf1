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
pool, stopping by itself. Per row: p50/p99 latency (client side, ms), throughput (requests/s =
examples/s), and top-1 agreement of the variant's predictions with the served FP32 model on
the same examples. Output: ``DIR/serve_bench.json`` (schema ``nano-tfx-serve-bench/1``) and
``DIR/serve_bench.md``; the table and the CPU flags (``lscpu``) are printed.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as _dt
import json
import os
import signal
import socket
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

SCHEMA = "nano-tfx-serve-bench/1"
VARIANTS = ("fp32", "inc", "openvino", "onnxruntime", "auto")
PLANS = {"full": dict(requests_c1=200, requests_c8=400, agreement=200),
         "quick": dict(requests_c1=30, requests_c8=64, agreement=64)}
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
                                                          os.path.join(root, variant))
            with open(os.path.join(dirs[variant], "nano_tfx.json")) as f:
                notes[f"{variant}_engine"] = json.load(f).get("backend")
            log(f"{name}/{variant}: quantized + layout written in {time.time() - started:.0f}s")
        except Exception as err:  # noqa: BLE001 - a failed variant is a row, not the end of the run
            notes[f"{variant}_failed"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"{name}/{variant}: FAILED {notes[f'{variant}_failed']}")
    return dirs, eval_examples, notes


# -- server and load --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: dict, log_path: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    names = list(models)
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", models[names[0]], "--name", names[0],
           "--port", str(port)] + [a for n in names[1:] for a in ("--model", f"{n}={models[n]}")]
    if threads:
        cmd += ["--threads", str(threads)]
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


def _payload(examples: list[bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": "examples", "shape": [len(examples)], "datatype": "BYTES",
                                   "data": [base64.b64encode(e).decode() for e in examples],
                                   "parameters": {"content_type": "base64"}}]}).encode()


def predict(session, url: str, model: str, examples: list[bytes]) -> np.ndarray:
    preds = []
    for i in range(0, len(examples), 32):
        r = session.post(f"{url}/v2/models/{model}/infer", data=_payload(examples[i:i + 32]),
                         headers={"content-type": "application/json"}, timeout=600)
        r.raise_for_status()
        out = r.json()["outputs"][0]
        preds.append(np.asarray(out["data"]).reshape(out["shape"]))
    return np.concatenate(preds)


def bounded_load(url: str, model: str, examples: list[bytes], n: int, concurrency: int) -> dict:
    """``n`` single-example requests, ``concurrency`` at a time; stops by itself."""
    import requests

    payloads = [_payload([examples[i % len(examples)]]) for i in range(n)]
    local = __import__("threading").local()

    def send(body: bytes) -> tuple[float, int]:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        t = time.perf_counter()
        try:
            code = local.s.post(f"{url}/v2/models/{model}/infer", data=body,
                                headers={"content-type": "application/json"}, timeout=600).status_code
        except requests.RequestException:
            code = -1  # connection reset / timeout: an error row, not the end of the run
        return (time.perf_counter() - t) * 1000.0, code

    for body in payloads[:2]:  # warm-up
        send(body)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, payloads))
    wall = time.perf_counter() - started
    lat = sorted(ms for ms, code in results if code == 200)
    errors = sum(1 for _, code in results if code != 200)
    return {"requests": n, "errors": errors, "p50_ms": round(statistics.median(lat), 3) if lat else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if lat else None,
            "throughput_rps": round(len(lat) / wall, 2) if wall > 0 else None}


def run_model(name: str, variants: list[str], plan: dict, tmp: str, threads: int | None, skip: set) -> dict:
    import requests

    root = os.path.join(tmp, name)
    os.makedirs(root, exist_ok=True)
    skipped = [v for v in variants if f"{name}:{v}" in skip and v != "fp32"]
    dirs, examples, notes = build_variants(name, root, [v for v in variants if v not in skipped])
    for v in skipped:
        notes[f"{v}_failed"] = "skipped (--skip)"
    served = {f"{name}_{v}": d for v, d in dirs.items()}
    log(f"{name}: starting one server with {sorted(served)}")
    proc, url = start_server(served, os.path.join(root, "server.log"), threads)
    rows = []
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
    return {"model": name, "rows": rows, "notes": notes, "server_exit_code": code}


def table(results: list[dict]) -> str:
    head = ("| model | variant | engine | agreement | c1 p50 ms | c1 p99 ms | c1 req/s | c1 x FP32 "
            "| c8 p50 ms | c8 p99 ms | c8 req/s | c8 x FP32 |")
    lines = [head, "|" + "---|" * 12]
    for res in results:
        for r in res["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {r['variant']} | {r['status']} |" + " |" * 9)
                continue
            c1, c8 = r["c1"], r["c8"]
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['engine']} | {r['top1_agreement_vs_fp32']:.4f} "
                f"| {c1['p50_ms']} | {c1['p99_ms']} | {c1['throughput_rps']} | {c1.get('speedup_vs_fp32')} "
                f"| {c8['p50_ms']} | {c8['p99_ms']} | {c8['throughput_rps']} | {c8.get('speedup_vs_fp32')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,digits")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="fp32 is always served")
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run; noisier numbers)")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (nano-tfx serve --threads)")
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
            results.append(run_model(name, variants, plan, work, args.threads, skip))
    env["loadavg_end"] = os.getloadavg()
    doc = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "mode": mode, "plan": plan, "env": env, "results": results}
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
    with open(os.path.join(args.out, "serve_bench.md"), "w") as f:
        f.write(md + "\n\n" + footer + "\n")
    print(md)
    print()
    print(footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
