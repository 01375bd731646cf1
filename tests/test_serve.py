"""``nano-tfx serve`` over real HTTP on localhost (V2 Open Inference Protocol, MLServer).

One server subprocess (started through the CLI) serves every layout side by side: the FP32
Trainer models, the Quantizer's ``Format-Serving/`` of each backend (INC SavedModel; OpenVINO IR
and ONNX + ``transform_graph/``) for the digits CNN and the penguin MLP, and a plain
``QuantizedModel.save`` folder (tensors in). Raw eval-split tf.Examples go in; INT8 must agree
with FP32 served the same way. The server is always stopped (SIGTERM, exit 0 is a test).
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_models  # noqa: E402

REPO = serve_models.REPO
BACKENDS = ["inc", "openvino", "onnxruntime"]
MAX_BATCH = 512
MAX_BODY = 2 * 1024 * 1024




def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def examples_request(examples) -> dict:
    return {"inputs": [{"name": "examples", "shape": [len(examples)], "datatype": "BYTES",
                        "data": [base64.b64encode(e).decode() for e in examples],
                        "parameters": {"content_type": "base64"}}]}


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: str):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.session = requests.Session()

    def infer(self, model: str, payload: dict, timeout: float = 120) -> requests.Response:
        return self.session.post(f"{self.url}/v2/models/{model}/infer", json=payload, timeout=timeout)

    def predict(self, model: str, examples) -> dict:
        r = self.infer(model, examples_request(examples))
        assert r.status_code == 200, r.text
        return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}

    def log_tail(self) -> str:
        return open(self.log).read()[-4000:] if os.path.exists(self.log) else ""


def _build(root: str) -> dict:
    """Every model folder the server gets: name -> path."""
    from pipelines.digits.features import LABEL_KEY as DIGITS_LABEL
    from pipelines.penguin.penguin_utils import LABEL_KEY as PENGUIN_LABEL

    models = {}
    for task, build, examples, label in (
        ("digits", serve_models.digits_models, serve_models.digits_examples, DIGITS_LABEL),
        ("penguin", serve_models.penguin_models, serve_models.penguin_examples, PENGUIN_LABEL),
    ):
        base = os.path.join(root, task)
        fp32, transform = build(base)
        calib = serve_models.transformed_inputs(fp32, transform, serve_models.quantizer_sample(examples("train")[0]))
        models[f"{task}_fp32"] = fp32
        for backend in BACKENDS:
            plain = os.path.join(base, "saved_ort") if (task, backend) == ("digits", "onnxruntime") else None
            models[f"{task}_{backend}"] = serve_models.write_layout(
                fp32, transform, calib, None if backend == "inc" else backend, os.path.join(base, backend), plain)
            if plain:
                models["digits_tensors"] = plain
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve"))
    models = _build(root)
    with serve_models.served(models, "digits_fp32", root, (
            "--max-batch-size", str(MAX_BATCH), "--max-request-size", str(MAX_BODY))) as (proc, port, log):
        srv = Server(proc, port, log)
        srv.models = models
        yield srv


@pytest.fixture(scope="module")
def digits_eval():
    return serve_models.digits_examples("eval", with_label=False)


@pytest.fixture(scope="module")
def penguin_eval():
    return serve_models.penguin_examples("eval", with_label=False)


@pytest.fixture(scope="module")
def fp32_outputs(server, digits_eval, penguin_eval):
    return {"digits": server.predict("digits_fp32", digits_eval[0]),
            "penguin": server.predict("penguin_fp32", penguin_eval[0])}


def test_body_limit_refuses_declared_and_streamed_oversize_bodies():
    """The 413 guard in front of the app, on a bare ASGI app (no server needed)."""
    import asyncio

    from components.serving.server import BodyLimit

    seen = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(chunks, declared=None):
        sent, queue = [], [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                           for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", str(declared).encode())] if declared is not None else []
        asyncio.run(BodyLimit(app, 1024)({"type": "http", "headers": headers}, receive, send))
        return sent[0]["status"]

    assert call([b"x" * 1000], declared=1000) == 200 and seen[-1] == b"x" * 1000
    assert call([b"x" * 600, b"y" * 400]) == 200 and seen[-1] == b"x" * 600 + b"y" * 400
    n = len(seen)
    assert call([b"x"], declared=5000) == 413  # refused on the header, body never read
    assert call([b"x" * 600, b"y" * 600]) == 413  # chunked: refused once over the limit
    assert len(seen) == n  # the app never saw either


def test_ready_only_once_loaded_and_listens_on_localhost(server):
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    for name in server.models:
        assert requests.get(f"{server.url}/v2/models/{name}/ready", timeout=10).status_code == 200
    # Default --host is 127.0.0.1: not reachable on another local address of this machine.
    log = open(server.log).read()
    assert f"on http://127.0.0.1:{server.port}" in log


def test_fp32_served_raw_examples_are_accurate(fp32_outputs, digits_eval, penguin_eval):
    for task, (_, labels) in (("digits", digits_eval), ("penguin", penguin_eval)):
        out = fp32_outputs[task]
        assert list(out) == ["outputs"]  # the FP32 serving_default's output name
        assert out["outputs"].shape[0] == len(labels)
        assert np.mean(out["outputs"].argmax(-1) == labels) >= (0.9 if task == "digits" else 0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_agrees_with_fp32_on_raw_examples(server, fp32_outputs, digits_eval, penguin_eval, backend):
    digits = server.predict(f"digits_{backend}", digits_eval[0])
    penguin = server.predict(f"penguin_{backend}", penguin_eval[0])
    assert list(digits) == list(fp32_outputs["digits"]) and list(penguin) == list(fp32_outputs["penguin"])
    want, got = fp32_outputs["digits"]["outputs"], digits["outputs"]
    assert got.shape == want.shape
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99
    # Penguin: the bar is the same class everywhere. Calibrated on the Quantizer's own
    # sample of the train split (quantizer_sample; the first 100 rows covered two species and
    # flipped 2-6 classes). OpenVINO flipped 2 more until its activation ranges became global
    # min/max for activations with few values per calibration item (backend._activation_range).
    agree = np.mean(penguin["outputs"].argmax(-1) == fp32_outputs["penguin"]["outputs"].argmax(-1))
    assert agree == 1.0, agree


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_layout_pushed_by_tfx_pusher_still_serves(server, fp32_outputs, digits_eval, tmp_path, backend):
    """TFX's filesystem Pusher copies with ``deny_regex_patterns=[r'saved_model\\.pb']`` and puts
    back only the top-level one: the nested transform graph arrives without its graph proto."""
    from tfx.utils import io_utils

    from components.serving.servable import load_servable

    pushed = str(tmp_path / "1")
    io_utils.copy_dir(server.models[f"digits_{backend}"], pushed, deny_regex_patterns=[r"saved_model\.pb"])
    assert not os.path.exists(os.path.join(pushed, "transform_graph", "transform_fn", "saved_model.pb"))
    got = load_servable(pushed).predict({"examples": np.array(digits_eval[0], dtype=object)})["outputs"]
    want = server.predict(f"digits_{backend}", digits_eval[0])["outputs"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not os.path.exists(os.path.join(pushed, "transform_graph", "transform_fn", "saved_model.pb"))  # untouched


def test_quantized_model_folder_takes_its_own_named_inputs(server, fp32_outputs, digits_eval):
    """No transform graph beside it: the model's inputs (transformed features) are the request."""
    calib = serve_models.transformed_inputs(server.models["digits_fp32"], os.path.join(
        os.path.dirname(server.models["digits_fp32"]), "transform_graph"), serve_models.digits_examples("eval")[0])
    x = calib["image_xf"].astype(np.float32)
    payload = {"inputs": [{"name": "image_xf", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = server.infer("digits_tensors", payload)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"]).reshape(out["shape"])
    assert np.mean(got.argmax(-1) == fp32_outputs["digits"]["outputs"].argmax(-1)) >= 0.99
    bad = {"inputs": [dict(payload["inputs"][0], shape=[len(x), 8, 8])]}
    assert server.infer("digits_tensors", bad).status_code == 400


def _bad_requests(examples):
    good = examples_request(examples[:4])["inputs"][0]
    return {
        "unknown input name": {"inputs": [dict(good, name="pixels")]},
        "garbage bytes": examples_request([b"\x00\xffnot a tf.Example" * 3, os.urandom(64)]),
        "invalid base64": {"inputs": [dict(good, data=["%%%not base64%%%"] * 4)]},
        "wrong datatype": {"inputs": [dict(good, datatype="FP32", data=[1.0, 2.0, 3.0, 4.0])]},
        "empty batch": {"inputs": [dict(good, shape=[0], data=[])]},
        "shape/data mismatch": {"inputs": [dict(good, shape=[7])]},
        "no inputs": {"inputs": []},
        "not V2 at all": {"instances": [1, 2, 3]},
        "too many rows": examples_request(examples[:1] * (MAX_BATCH + 1)),
    }


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, fp32_outputs, digits_eval):
    examples = digits_eval[0]
    for model in ("digits_fp32", "digits_openvino"):
        for what, payload in _bad_requests(examples).items():
            r = server.infer(model, payload)
            assert 400 <= r.status_code < 500, (model, what, r.status_code, r.text)
            assert r.text, (model, what)
        assert server.infer("no_such_model", examples_request(examples[:2])).status_code == 404
        r = server.session.post(f"{server.url}/v2/models/{model}/infer", data=b"{not json", timeout=30,
                                headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500
        r = server.session.post(f"{server.url}/v2/models/{model}/infer", data=b" " * (MAX_BODY + 1), timeout=30)
        assert r.status_code == 413 and "max-request-size" in r.text
    assert server.proc.poll() is None
    again = server.predict("digits_fp32", examples)
    np.testing.assert_allclose(again["outputs"], fp32_outputs["digits"]["outputs"], rtol=1e-5, atol=1e-5)


def test_bounded_load_leaves_memory_and_answers_as_before(server, fp32_outputs, digits_eval):
    """300 requests (some oversized or malformed) at concurrency 4, then the same answers and
    RSS back near where it started."""
    examples = digits_eval[0]
    bad = list(_bad_requests(examples).values())
    warm = [examples_request(examples[i:i + 32]) for i in range(0, 320, 32)]
    model = "digits_onnxruntime"
    for payload in warm:  # allocator pools and kernels warmed up before the baseline
        assert server.infer(model, payload).status_code == 200
    before = _rss_mb(server.proc.pid)
    jobs = [(warm[i % len(warm)] if i % 5 else bad[i % len(bad)]) for i in range(300)]

    def send(payload):
        return server.infer(model, payload).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(send, jobs))
    assert codes.count(200) == sum(1 for i in range(300) if i % 5)
    assert all(400 <= c < 500 for c in codes if c != 200)
    after = _rss_mb(server.proc.pid)
    assert after - before < max(64.0, 0.15 * before), (before, after)
    want = server.predict(model, examples)["outputs"]
    got = server.predict(model, examples)["outputs"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.mean(got.argmax(-1) == fp32_outputs["digits"]["outputs"].argmax(-1)) >= 0.99


def test_adaptive_batching_answers_each_request_as_alone(server, digits_eval, tmp_path):
    """``--adaptive-batch-size``: MLServer merges concurrent requests into one engine call and
    splits the answer back. 24 concurrent requests of 1-4 rows each get exactly the rows they
    would get alone, on a second server with batching on; a malformed request still gets its 4xx
    and the server keeps serving. (A malformed request merged with good ones fails them too: the
    batch is one engine call. That is why batching is off by default; see ``serve --help``.)"""
    model = "digits_onnxruntime"
    examples = digits_eval[0]
    sizes = [1 + i % 4 for i in range(24)]
    starts = np.cumsum([0] + sizes[:-1])
    chunks = [examples[a:a + n] for a, n in zip(starts, sizes)]
    alone = [server.predict(model, c)["outputs"] for c in chunks]
    extra = ("--adaptive-batch-size", "8", "--adaptive-batch-time", "0.05")
    with serve_models.served({model: server.models[model]}, model, str(tmp_path), extra) as (proc, port, log):
        batched = Server(proc, port, log)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda c: batched.infer(model, examples_request(c)), chunks))
        for want, reply in zip(alone, replies):
            assert reply.status_code == 200, (reply.text, batched.log_tail())
            out = reply.json()["outputs"][0]
            np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), want, rtol=1e-5, atol=1e-5)
        bad = batched.infer(model, _bad_requests(examples)["garbage bytes"])
        assert 400 <= bad.status_code < 500, bad.text
        np.testing.assert_allclose(batched.predict(model, chunks[0])["outputs"], alone[0], rtol=1e-5, atol=1e-5)
        assert proc.poll() is None


def test_cli_rejects_a_missing_model_dir_without_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", str(tmp_path / "nope"), "--name", "m"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MODEL_DIR" in proc.stderr


def test_zz_sigterm_stops_the_server_cleanly(server):
    """Last in the file: the module's server is stopped here, exit code 0."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, server.log_tail()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/health/ready", timeout=5)
