"""Timing check (not a test): OpenVINO backend on MobileNetV2 (random weights), batch 1.

    .venv/bin/python -m benchmarks._ov_timing [--threads N] [--n 200]

For FP32 (f32 hint), INT8 (default NNCF config) and, where the CPU has it, BF16: latency of
``OpenVINOCandidate.run`` vs raw OpenVINO on the *same* compiled model:
``raw_req``   = ``req.infer({0: x}, share_inputs=True)`` + read the output (a copy),
``raw_call``  = ``compiled_model(x)`` (OpenVINO's convenience call),
``raw_floor`` = set_input_tensor(shared) + infer() + output view, no copy (the floor).
The wrapper must stay within 5% of ``raw_req``. Random weights/inputs: latency only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def _bench(fn, n: int, warmup: int = 5) -> tuple[float, float]:
    """(median wall ms per call, process CPU ms per call) over ``n`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    cpu = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, (time.process_time() - cpu) / n * 1e3


def _interleaved(fns: dict, rounds: int, n: int) -> dict:
    """Alternate blocks of each variant (cancels drift and noisy neighbours); min of medians.
    With --threads 1 the CPU ms/call is the latency an idle core would show (robust to a
    loaded machine, where wall time mostly measures the neighbours)."""
    res = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            res[k].append(_bench(f, n))
    return {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in res.items()}


class _RandomCalib:
    batch_size = 1

    def __init__(self, shape, n):
        rng = np.random.default_rng(0)
        self.num_samples = n
        self._batches = [[rng.random((1,) + shape, dtype=np.float32)] for _ in range(n)]

    def __iter__(self):
        return iter(self._batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n", type=int, default=50, help="calls per block")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import keras
    import openvino as ov

    from nano_tfx.backends.base import BackendOptions, TrialConfig
    from nano_tfx.backends.openvino import OpenVINOBackend, cpu_capabilities
    from nano_tfx.interchange import to_saved_model

    print(f"openvino {ov.get_version()}  cpu capabilities {sorted(cpu_capabilities())}  threads={args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
        source = to_saved_model(model, tmp)
        backend = OpenVINOBackend(BackendOptions(thread_num=args.threads))
        t = time.perf_counter()
        prepared = backend.prepare(source, tmp)
        print(f"prepare (convert_model + IR) {time.perf_counter() - t:.1f}s")
        candidates = {"fp32": backend.reference(prepared)}
        t = time.perf_counter()
        candidates["int8"] = backend.quantize(prepared, "int8", TrialConfig.make(), _RandomCalib((224, 224, 3), 100))
        print(f"int8 quantize (100 samples) {time.perf_counter() - t:.1f}s  {candidates['int8'].details}")
        if "bf16" in backend.precisions:
            candidates["bf16"] = backend.quantize(prepared, "bf16", TrialConfig.make(), None)
        else:
            print("bf16: not offered (no native BF16 on this CPU; OpenVINO would silently run f32)")

        x = np.random.default_rng(1).random((1, 224, 224, 3), dtype=np.float32)
        for prec, cand in candidates.items():
            cm = cand.compiled
            req = cm.create_infer_request()
            out = cm.outputs[0]
            floor_req = cm.create_infer_request()

            def raw_req():
                return req.infer({0: x}, share_inputs=True)[out]

            def raw_call():
                return cm(x)[out]

            def raw_floor():
                floor_req.set_input_tensor(ov.Tensor(x, shared_memory=True))
                floor_req.infer()
                return floor_req.get_output_tensor().data

            def wrapper():
                return cand.run([x])[0]

            np.testing.assert_allclose(wrapper(), raw_req(), rtol=1e-5, atol=1e-6)
            r = _interleaved(
                {"wrapper": wrapper, "raw_req": raw_req, "raw_call": raw_call, "raw_floor": raw_floor},
                args.rounds, args.n,
            )
            hint = cm.get_property("INFERENCE_PRECISION_HINT")
            for i, what in ((0, "wall"), (1, "cpu ")):
                overhead = (r["wrapper"][i] / r["raw_req"][i] - 1) * 100
                print(
                    f"{prec:5s} (hint {hint}) {what} ms: wrapper {r['wrapper'][i]:.3f} | raw_req "
                    f"{r['raw_req'][i]:.3f} | raw_call {r['raw_call'][i]:.3f} | raw_floor "
                    f"{r['raw_floor'][i]:.3f}  -> wrapper vs raw_req {overhead:+.1f}%"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
