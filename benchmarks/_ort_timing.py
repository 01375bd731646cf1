"""Timing check (not a test): ONNX Runtime backend on MobileNetV2 (random weights), batch 1.

    .venv/bin/python -m benchmarks._ort_timing [--threads N] [--configs all]

Reports FP32 ORT latency, INT8 latency per static config, and ``OrtCandidate.run`` vs a raw
``sess.run`` on the same session (the wrapper must stay within 5%). Builds nothing persistent:
everything lives in a temp dir. Random weights/inputs: latency only, no accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def _bench(fn, n: int, warmup: int = 20) -> float:
    """10th percentile of per-call ms over ``n`` calls after ``warmup``: on a shared machine the
    low percentile tracks the uncontended latency; the median tracks the neighbours' load."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 10] * 1e3


def _interleaved(fa, fb, rounds: int, n: int) -> tuple[float, float]:
    """A and B alternate call by call (neighbours' load hits both alike); 10th percentile ms."""
    for _ in range(5):
        fa(), fb()
    ta, tb = [], []
    clock = time.perf_counter
    for i in range(rounds * n):
        first, second, t1, t2 = (fa, fb, ta, tb) if i % 2 == 0 else (fb, fa, tb, ta)
        t = clock()
        first()
        t1.append(clock() - t)
        t = clock()
        second()
        t2.append(clock() - t)
    ta.sort(), tb.sort()
    return ta[len(ta) // 10] * 1e3, tb[len(tb) // 10] * 1e3


class _RandomCalib:
    def __init__(self, shape, n):
        rng = np.random.default_rng(0)
        self._batches = [[rng.random((1,) + shape, dtype=np.float32)] for _ in range(n)]

    def __iter__(self):
        return iter(self._batches)


def _tiny_overhead(tmp: str) -> tuple[float, float]:
    """Raw vs wrapper on a 1-node model: isolates the wrapper's Python cost (microseconds)."""
    import onnx
    from onnx import TensorProto, helper

    from nano_tfx.backends.onnxruntime import OrtCandidate

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
    )
    path = os.path.join(tmp, "tiny.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cand = OrtCandidate(path, ["x"], ["y"], "fp32")
    sess, x = cand.session, np.ones((1, 10), np.float32)
    r, w = _interleaved(lambda: sess.run(["y"], {"x": x}), lambda: cand.run([x]), rounds=7, n=3000)
    return r * 1e3, w * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", default="default", choices=["default", "all"])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import keras
    import onnxruntime as ort

    from nano_tfx.backends.base import BackendOptions, TrialConfig
    from nano_tfx.backends.onnxruntime import OnnxRuntimeBackend, OrtCandidate, cpu_has_vnni
    from nano_tfx.interchange import to_saved_model

    print(f"onnxruntime {ort.__version__}, cpu vnni={cpu_has_vnni()}, threads={args.threads or 'default'}")
    with tempfile.TemporaryDirectory(prefix="ort_timing_") as tmp:
        model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
        t = time.perf_counter()
        source = to_saved_model(model, tmp)
        print(f"export SavedModel: {time.perf_counter() - t:.1f}s")
        backend = OnnxRuntimeBackend(BackendOptions(thread_num=args.threads))
        t = time.perf_counter()
        prepared = backend.prepare(source, tmp)
        print(f"prepare (tf2onnx + quant_pre_process): {time.perf_counter() - t:.1f}s, "
              f"preprocess={prepared.preprocessed}")
        space = backend.search_space(prepared, "int8", "static")
        print(f"knobs: {dict(space.knobs)}; {len(space.fallback_candidates)} fallback candidates, "
              f"first 3: {list(space.fallback_candidates[:3])}")
        x = [np.random.default_rng(1).random((1, 224, 224, 3), dtype=np.float32)]
        calib = _RandomCalib((224, 224, 3), 32)

        fp32 = OrtCandidate(prepared.fp32_path, prepared.input_names, prepared.output_names, "fp32",
                            backend.session_options())
        default = space.default()
        t = time.perf_counter()
        int8 = backend.quantize(prepared, "int8", default, calib)
        print(f"quantize default ({len(calib._batches)} calib samples): {time.perf_counter() - t:.1f}s, "
              f"{int8.size_bytes() / 1e6:.1f} MB vs FP32 {os.path.getsize(prepared.fp32_path) / 1e6:.1f} MB")
        f, q = _interleaved(lambda: fp32.run(x), lambda: int8.run(x), args.rounds, args.n)
        print(f"FP32 ORT b1: {f:.2f} ms | INT8 default {dict(default.knobs)}: {q:.2f} ms "
              f"(x{f / q:.2f})")

        if args.configs == "all":
            base = dict(default.knobs)
            for knob, values in space.knobs.items():
                for v in values[1:]:
                    if knob == "calibrate_method":
                        continue  # same inference graph; only calibration time differs
                    cfg = TrialConfig.make({**base, knob: v})
                    t = time.perf_counter()
                    cand = backend.quantize(prepared, "int8", cfg, calib)
                    qt = time.perf_counter() - t
                    d, c = _interleaved(lambda: int8.run(x), lambda: cand.run(x), args.rounds, args.n // 2)
                    print(f"  {knob}={v!r}: {c:.2f} ms vs default {d:.2f} ms (quantize {qt:.1f}s)")
                    del cand
            for cal in space.knobs["calibrate_method"][1:]:
                t = time.perf_counter()
                backend.quantize(prepared, "int8", TrialConfig.make({**base, "calibrate_method": cal}), calib)
                print(f"  calibrate_method={cal!r}: quantize {time.perf_counter() - t:.1f}s")

        sess, feed_name, out_names = int8.session, prepared.input_names[0], prepared.output_names
        raw = lambda: sess.run(out_names, {feed_name: x[0]})  # noqa: E731
        wrapped = lambda: int8.run(x)  # noqa: E731
        r, w = _interleaved(raw, wrapped, args.rounds, args.n)
        print(f"INT8 default: raw sess.run {r:.3f} ms vs Candidate.run {w:.3f} ms ({(w / r - 1) * 100:+.1f}%)")
        r, w = _tiny_overhead(tmp)
        print(f"tiny model (pure call overhead): raw {r:.2f} us vs Candidate.run {w:.2f} us "
              f"(+{w - r:.2f} us per call)")
        if "fp16" in backend.precisions:
            t = time.perf_counter()
            c16 = backend.quantize(prepared, "fp16", TrialConfig.make(), None)
            ct = time.perf_counter() - t
            f, h = _interleaved(lambda: fp32.run(x), lambda: c16.run(x), args.rounds, args.n // 2)
            print(f"FP16 (fp32 IO): {h:.2f} ms vs FP32 {f:.2f} ms (convert {ct:.1f}s, "
                  f"{c16.size_bytes() / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
