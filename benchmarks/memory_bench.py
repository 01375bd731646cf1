"""Peak RSS of quantization vs FP32 prediction, each in a fresh process (issue 19, item 4).

    .venv/bin/python benchmarks/memory_bench.py [--models mobilenetv2,efficientnetb0]
        [--backends inc,onnxruntime,openvino] [--calib 100[,400]] [--data array|generator]
        [--metric [--max-trials 3]] [--batch N] [--json PATH]

Per model, one subprocess builds the Keras model (``weights=None``, 224x224) and predicts the
calibration images in FP32 (batch 32): its peak RSS (``ru_maxrss``) is the baseline. Per
backend and calibration size, another subprocess builds the same model and quantizes it
(``nano_tfx.quantize(model, accelerator=..., calib_dataset=images, sample_size=n)``):
``quant_peak_mb`` is that process' peak; it saves the result, and a third subprocess
``nano_tfx.load``s it and predicts the same images at batch 32 (``infer_peak_mb``, no TF model
built). ``ratio`` = quant_peak / baseline; the target is <= 3.

``--data generator`` feeds calibration from a generator function (nothing held by the caller),
so ``quant_peak - rss_before`` across ``--calib`` sizes shows whether nano-tfx's own memory grows
with the calibration size. ``--metric`` adds an accuracy metric (labels from the FP32 model,
``max_trials=3``): evaluation and the diagnosis between trials are then measured too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BATCH = 32


def _build(name: str):
    import keras

    app = {"mobilenetv2": keras.applications.MobileNetV2,
           "efficientnetb0": keras.applications.EfficientNetB0}[name]
    return app(weights=None, input_shape=(224, 224, 3))


def _images(name: str, n: int, start: int = 0):
    import numpy as np

    rng = np.random.default_rng(start + 1)
    lo, hi = (-1.0, 1.0) if name == "mobilenetv2" else (0.0, 255.0)
    return rng.uniform(lo, hi, size=(n, 224, 224, 3)).astype(np.float32)


def _child(args) -> dict:
    """One measurement in this (fresh) process; returns the numbers as a dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, HERE)
    if args.mode != "fp32":
        import nano_tfx  # noqa: F401  (first: oneDNN for INC)
    import numpy as np

    from _rss import lifetime_peak_mb, rss_mb

    infer = args.mode.startswith("infer:")
    model = None if infer else _build(args.model)
    out = {"model": args.model, "mode": args.mode, "calib": args.calib, "data": args.data}
    if args.data == "array":
        x = _images(args.model, args.calib)
        data = x
    else:
        rows = args.batch or 10

        def data():  # regenerated per pass: nothing but one batch is ever held
            for i in range(0, args.calib, rows):
                yield _images(args.model, min(rows, args.calib - i), i)
        x = None
    if infer:  # the saved INT8 model, loaded in a fresh process (no Keras model built)
        import nano_tfx

        q = nano_tfx.load(args.mode.split(":", 1)[1])
        for i in range(0, args.calib, BATCH):
            chunk = x[i:i + BATCH] if x is not None else _images(args.model, min(BATCH, args.calib - i), i)
            q.run([chunk])
        out["peak_mb"] = lifetime_peak_mb()
        return out
    if args.mode == "fp32":
        for i in range(0, args.calib, BATCH):
            chunk = x[i:i + BATCH] if x is not None else _images(args.model, min(BATCH, args.calib - i), i)
            model.predict(chunk, batch_size=BATCH, verbose=0)
        out["peak_mb"] = lifetime_peak_mb()
        return out
    import nano_tfx

    out["rss_before_mb"] = rss_mb()
    kwargs = dict(accelerator=None if args.mode == "inc" else args.mode, sample_size=args.calib, batch=args.batch)
    if args.metric:  # labels: the FP32 model's own top-1 (an unreachable bar: every trial runs)
        kwargs.update(metric="accuracy", accuracy_criterion={"relative": 0.0001, "higher_is_better": True},
                      max_trials=args.max_trials)
        if x is not None:
            kwargs.update(x=x, y=np.argmax(model.predict(x, batch_size=BATCH, verbose=0), -1))
        else:
            unlabelled = data

            def labelled():
                for xs in unlabelled():
                    yield xs, np.argmax(np.asarray(model(xs, training=False)), -1)
            kwargs.update(calib_dataset=labelled)
        try:
            q = nano_tfx.quantize(model, **kwargs)
        except nano_tfx.AccuracyCriterionNotMet as err:
            q = err.best_model
    else:
        q = nano_tfx.quantize(model, calib_dataset=data, **kwargs)
    out["quant_peak_mb"] = lifetime_peak_mb()
    out["trials"] = len(q.report.trials)
    if args.save:
        q.save(args.save)
    return out


def measure(model: str, mode: str, calib: int, data: str, metric: bool, save: str | None = None,
            extra: list | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--models", model, "--calib", str(calib),
           "--data", data] + (["--metric"] if metric else []) + (["--save", save] if save else []) + (extra or [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.environ.get("TMPDIR", "/tmp"))
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"model": model, "mode": mode, "calib": calib, "error": (proc.stderr or "")[-800:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,efficientnetb0")
    ap.add_argument("--backends", default="inc,onnxruntime,openvino")
    ap.add_argument("--calib", default="100")
    ap.add_argument("--data", choices=("array", "generator"), default="array")
    ap.add_argument("--metric", action="store_true")
    ap.add_argument("--max-trials", type=int, default=3, help="with --metric")
    ap.add_argument("--batch", type=int, default=None,
                    help="quantize(batch=...): evaluation batch rows (default 1); --data generator: its batch rows (default 10)")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode, args.model, args.calib = args.child, args.models, int(args.calib)
        print(json.dumps(_child(args)), flush=True)
        return 0
    rows = []
    print("| model | backend | calib | FP32 process MB | quantize peak MB | ratio | inference peak MB | trials |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for calib in [int(c) for c in args.calib.split(",")]:
            base = measure(model, "fp32", calib, args.data, False)
            rows.append(base)
            for backend in args.backends.split(","):
                saved = tempfile.mkdtemp(prefix="nano_tfx_memory_bench_")
                try:
                    r = measure(model, backend, calib, args.data, args.metric, os.path.join(saved, "q"),
                                ["--max-trials", str(args.max_trials)] + (["--batch", str(args.batch)] if args.batch else []))
                    if "error" not in r:
                        r["infer_peak_mb"] = measure(model, "infer:" + os.path.join(saved, "q"), calib, args.data,
                                                     False).get("peak_mb")
                finally:
                    shutil.rmtree(saved, ignore_errors=True)
                r["baseline_mb"] = base.get("peak_mb")
                if r.get("quant_peak_mb") and base.get("peak_mb"):
                    r["ratio"] = r["quant_peak_mb"] / base["peak_mb"]
                rows.append(r)
                if "error" in r:
                    print(f"| {model} | {backend} | {calib} | {base.get('peak_mb', 0):.0f} | failed: "
                          f"{r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else '?'} | | | |",
                          flush=True)
                    continue
                infer = r.get("infer_peak_mb")
                print(f"| {model} | {backend} | {calib} | {base['peak_mb']:.0f} | {r['quant_peak_mb']:.0f} | "
                      f"{r['ratio']:.2f} | {'' if infer is None else f'{infer:.0f}'} | {r['trials']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
