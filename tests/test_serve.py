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


def _split(response: requests.Response) -> dict:
    from components.serving.runtime import parse_server_timing

    return parse_server_timing(response.headers.get("server-timing", ""))


@pytest.mark.parametrize("model, stages", [
    ("digits_onnxruntime", ["decode", "queue", "transform", "engine", "encode", "app"]),  # engine + transform_graph
    ("digits_fp32", ["decode", "queue", "model", "encode", "app"]),  # one TensorFlow call
    ("digits_tensors", ["decode", "queue", "engine", "encode", "app"]),  # the model's own inputs
])
def test_each_answer_carries_its_stage_split(server, digits_eval, model, stages):
    """``Server-Timing``: the runtime's stages in call order, then the whole app; the stages fit
    inside the app's time and the app inside what the client waited (behaviour, not speed)."""
    import time

    if model == "digits_tensors":
        fp32 = server.models["digits_fp32"]
        calib = serve_models.transformed_inputs(fp32, os.path.join(os.path.dirname(fp32), "transform_graph"),
                                                serve_models.digits_examples("eval")[0][:3])
        x = calib["image_xf"].astype(np.float32)
        payload = {"inputs": [{"name": "image_xf", "shape": list(x.shape), "datatype": "FP32",
                               "data": x.ravel().tolist()}]}
    else:
        payload = examples_request(digits_eval[0][:3])
    for _ in range(3):
        started = time.perf_counter()
        r = server.infer(model, payload)
        waited_ms = (time.perf_counter() - started) * 1000.0
        assert r.status_code == 200, r.text
        split = _split(r)
        assert list(split) == stages, r.headers.get("server-timing")
        assert all(v >= 0 for v in split.values()), split
        inner = sum(v for k, v in split.items() if k != "app")
        assert inner <= split["app"] + 0.001 * len(split), split  # 3-decimal rounding
        assert split["app"] <= waited_ms, (split, waited_ms)
        assert "headers" not in json.dumps(r.json())  # the split travels as a header, not in the body
    bad = server.infer(model, {"inputs": []})  # an error answer: the app's time only
    assert 400 <= bad.status_code < 500 and list(_split(bad)) == ["app"]


def test_fast_infer_route_renders_what_mlserver_would():
    """``fast_infer_routes`` skips FastAPI's response-model pass; the body must be the same JSON
    MLServer's own route sends (``exclude_unset`` / ``exclude_none``), numbers included."""
    from fastapi.encoders import jsonable_encoder
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceResponse, Parameters

    from components.serving.server import response_content

    out = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    response = InferenceResponse(model_name="m", id="1", parameters=Parameters(content_type="np"), outputs=[
        NumpyCodec.encode_output("outputs", out), NumpyCodec.encode_output("ids", np.arange(3, dtype=np.int64))])
    want = jsonable_encoder(response, exclude_unset=True, exclude_none=True)
    assert json.loads(json.dumps(response_content(response))) == json.loads(json.dumps(want))


def test_servable_times_its_stages_only_when_asked():
    from components.serving.servable import Servable, TensorSpec, _Stage

    def run(arrays, timings):
        with _Stage(timings, "transform"):
            x = arrays["x"] * 2
        with _Stage(timings, "engine"):
            return {"y": x + 1}

    servable = Servable("tensors", "test", [TensorSpec("x", np.dtype(np.float32), (None,))], ["y"], run,
                        ("transform", "engine"))
    timings: dict = {}
    got = servable.predict({"x": np.ones(2, np.float32)}, timings)
    np.testing.assert_array_equal(got["y"], [3, 3])
    assert list(timings) == list(servable.stages) and all(v >= 0 for v in timings.values())
    np.testing.assert_array_equal(servable.predict({"x": np.ones(2, np.float32)})["y"], [3, 3])  # no dict: fine


def test_server_timing_round_trip_and_request_timer():
    import asyncio

    from components.serving.runtime import parse_server_timing, server_timing
    from components.serving.server import RequestTimer

    assert parse_server_timing(server_timing({"decode": 0.1234, "engine": 2.0})) == {"decode": 0.123, "engine": 2.0}
    assert parse_server_timing("cache;desc=hit, engine;dur=x, app;dur=1.5") == {"app": 1.5}

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"server-timing", b"engine;dur=1.000")] if scope["path"] == "/a" else []})
        await send({"type": "http.response.body", "body": b"ok"})

    def headers(path):
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(RequestTimer(app)({"type": "http", "path": path, "headers": []}, None, send))
        return parse_server_timing(dict(sent[0]["headers"])[b"server-timing"].decode())

    assert list(headers("/a")) == ["engine", "app"] and list(headers("/b")) == ["app"]


def test_bench_split_sums_to_the_request_time():
    """``serve_bench``'s split: the stages, the server's own overhead and HTTP add up to the
    client's latency (per request, so the medians are consistent with it)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import serve_bench

    samples = [(10.0, {"decode": 0.2, "queue": 0.1, "transform": 1.0, "engine": 2.0, "encode": 0.2, "app": 5.0}),
               (12.0, {"decode": 0.2, "queue": 0.1, "transform": 1.2, "engine": 2.5, "encode": 0.2, "app": 6.0})]
    split = serve_bench.split_ms(samples)
    assert split["engine"] == 2.25 and split["app"] == 5.5
    assert split["server_overhead"] == pytest.approx(1.65) and split["http"] == 5.5
    inner = sum(split[k] for k in ("decode", "queue", "transform", "engine", "encode", "server_overhead"))
    assert inner == pytest.approx(split["app"]) and inner + split["http"] <= 11.0 + 1e-9


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


def _runtime(monkeypatch, inline_max_rows, run):
    """A NanoTfxRuntime over a stub servable (input ``x``, FP32, one row per value)."""
    import asyncio

    from mlserver.settings import ModelParameters, ModelSettings

    from components.serving import runtime as rt
    from components.serving.servable import Servable, TensorSpec

    servable = Servable("tensors", "test", [TensorSpec("x", np.dtype(np.float32), (None,))], ["y"], run, ("engine",))
    monkeypatch.setattr(rt, "load_servable", lambda uri, thread_num=None: servable)
    extra = {} if inline_max_rows is None else {"inline_max_rows": inline_max_rows}
    model = rt.NanoTfxRuntime(ModelSettings(name="m", implementation=rt.NanoTfxRuntime,
                                            parameters=ModelParameters(uri="/nonexistent", extra=extra)))
    asyncio.run(model.load())
    return model


def _x_request(rows: int):
    from mlserver.types import InferenceRequest, RequestInput

    return InferenceRequest(inputs=[RequestInput(name="x", shape=[rows], datatype="FP32", data=[1.0] * rows)])


def test_small_requests_run_on_the_event_loop_large_ones_in_the_pool(monkeypatch):
    """``inline_max_rows``: a request of at most that many rows runs its engine call on the
    event-loop thread (no thread hop), a larger one in the pool; 0 sends every request to the
    pool; a request finding the engine busy (a pool thread holds it) waits in the pool, not on
    the event loop, which keeps answering meanwhile. Same answers whichever thread runs them."""
    import asyncio
    import threading

    from components.serving.runtime import DEFAULT_INLINE_MAX_ROWS

    threads: list = []

    def run(arrays, timings):
        threads.append(threading.current_thread())
        return {"y": arrays["x"] + 1}

    def thread_of(model, rows):
        async def go():
            response = await model.predict(_x_request(rows))
            return threading.current_thread(), response

        threads.clear()
        loop_thread, response = asyncio.run(go())
        assert response.outputs[0].data.__root__ == [2.0] * rows
        return "loop" if threads == [loop_thread] else "pool"

    model = _runtime(monkeypatch, None, run)
    assert DEFAULT_INLINE_MAX_ROWS >= 1
    assert thread_of(model, 1) == "loop" and thread_of(model, DEFAULT_INLINE_MAX_ROWS) == "loop"
    assert thread_of(model, DEFAULT_INLINE_MAX_ROWS + 1) == "pool"
    model = _runtime(monkeypatch, 0, run)
    assert thread_of(model, 1) == "pool"
    model = _runtime(monkeypatch, 2, run)
    assert thread_of(model, 2) == "loop" and thread_of(model, 3) == "pool"

    async def busy_engine():  # the engine held elsewhere: the small request waits off the loop
        model._engine_lock.acquire()
        threads.clear()
        task = asyncio.ensure_future(model.predict(_x_request(1)))
        ticks = 0
        for _ in range(5):  # the loop keeps running while the request waits for the engine
            await asyncio.sleep(0.01)
            ticks += 1
        assert not task.done() and threads == []
        model._engine_lock.release()
        response = await task
        return ticks, response, threading.current_thread()

    ticks, response, loop_thread = asyncio.run(busy_engine())
    assert ticks == 5 and response.outputs[0].data.__root__ == [2.0]
    assert len(threads) == 1 and threads[0] is not loop_thread


def test_event_loop_and_inline_options():
    from components.serving.server import ServeOptions, event_loop_name

    try:
        import uvloop  # noqa: F401
        auto = "uvloop"
    except ImportError:
        auto = "asyncio"
    assert event_loop_name("auto") == auto and event_loop_name() == auto
    assert event_loop_name("asyncio") == "asyncio" and event_loop_name("uvloop") == "uvloop"
    assert ServeOptions().event_loop == "auto" and ServeOptions(inline_max_rows=0).inline_max_rows == 0
    with pytest.raises(ValueError, match="event_loop"):
        ServeOptions(event_loop="trio")
    with pytest.raises(ValueError, match="inline_max_rows"):
        ServeOptions(inline_max_rows=-1)


def test_direct_route_answers_what_mlservers_route_would(monkeypatch):
    """``DirectInfer`` (plain V2 requests straight to the runtime) against MLServer's own path for
    the same request: the same JSON body, CloudEvents headers and request id; anything it does not
    answer itself (other forms, unknown models) reaches the app with the body intact; errors
    are MLServer's ``{"error": ...}`` with the runtime's status; gzip for clients that ask."""
    import asyncio
    import gzip

    from mlserver.handlers.dataplane import DataPlane
    from mlserver.settings import Settings
    from mlserver.utils import extract_headers

    from components.serving.server import DirectInfer, response_content

    model = _runtime(monkeypatch, None, lambda arrays, timings: {"y": arrays["x"] * 2})
    data_plane = DataPlane(Settings(), None)

    class Registry:
        async def get_model(self, name, version=None):
            if name != "m":
                raise KeyError(name)
            return model

    inner: list = []

    async def app(scope, receive, send):  # MLServer's app stand-in: records what reached it
        inner.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    direct = DirectInfer(app, Registry(), data_plane, limit=4096)

    def post(path, payload, gzip_ok=False):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        scope = {"type": "http", "method": "POST", "path": path,
                 "headers": [(b"accept-encoding", b"gzip")] if gzip_ok else []}
        got: list = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            got.append(message)

        asyncio.run(direct(scope, receive, send))
        return got[0]["status"], {k.decode(): v.decode() for k, v in got[0]["headers"]}, got[1]["body"]

    request = {"id": "r1", "inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.5, -3.0]}]}
    status, headers, body = post("/v2/models/m/infer", request)
    # MLServer's path for the same request: runtime.predict, the data plane's id and CloudEvents
    # headers, the headers moved out of the body, the rendered content
    from mlserver.types import InferenceRequest

    want = asyncio.run(model.predict(InferenceRequest.parse_obj(request)))
    want.id = "r1"
    data_plane._inference_middleware.response_middleware(want, model.settings)
    want_headers = extract_headers(want)
    assert status == 200 and json.loads(body) == json.loads(json.dumps(response_content(want)))
    assert {k: v for k, v in headers.items() if k.startswith("ce-")} == {
        k.lower(): v for k, v in want_headers.items() if k.lower().startswith("ce-")}
    stages = [e.split(";")[0] for e in headers["server-timing"].split(", ")]
    assert stages == ["decode", "queue", "encode", "app"] and int(headers["content-length"]) == len(body)
    assert not inner  # answered without MLServer's app

    no_id = dict(request)
    del no_id["id"]
    assert len(json.loads(post("/v2/models/m/versions/v1/infer", no_id)[2])["id"]) >= 32  # a uuid, as MLServer's

    status, headers, zipped = post("/v2/models/m/infer", dict(request, inputs=[dict(
        request["inputs"][0], shape=[200], data=[0.5] * 200)]), gzip_ok=True)
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(zipped))["outputs"][0]["data"] == [1.0] * 200

    status, headers, body = post("/v2/models/m/infer", dict(request, inputs=[dict(request["inputs"][0], name="z")]))
    assert status == 400 and "inputs: expected ['x']" in json.loads(body)["error"]
    assert [e.split(";")[0] for e in headers["server-timing"].split(", ")] == ["app"]

    for other in (dict(request, parameters={"content_type": "np"}), {"inputs": []}, b"{not json"):
        inner.clear()
        assert post("/v2/models/m/infer", other)[0] == 299
        assert inner == [other if isinstance(other, bytes) else json.dumps(other).encode()]
    assert post("/v2/models/nope/infer", request)[0] == 299  # MLServer's 404
    status, _, body = post("/v2/models/m/infer", b"x" * 5000)
    assert status == 413 and b"max-request-size 4096" in body
