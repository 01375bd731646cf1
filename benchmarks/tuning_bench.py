"""Tuning wall time: trials per minute of one job under each trial runner, one run.

    .venv/bin/python benchmarks/tuning_bench.py [--trials 6] [--size 96] [--runners a,b,...] [--out DIR]

The job: MobileNetV2 (``--size``² × 3, ``weights=None``) on ONNX Runtime INT8, 64 calibration /
evaluation images, ``--trials`` accuracy-controlled trials (an unreachable baseline makes every
trial run). Runners, each on the same job:

* ``in-process``            ``LocalRunner`` (the Keras API);
* ``quantizer-local``       ``BeamTrialRunner`` with the local pipelines' Beam args
                            (``--direct_running_mode=multi_processing --direct_num_workers=2``) as
                            the Quantizer builds it: trials in-process on the DirectRunner;
* ``beam-direct-mp``        the same args with ``in_process=False``: each batch of trials is a
                            multi-processing DirectRunner pipeline (what the Quantizer did before);
* ``beam-dask``             ``DaskRunner`` on a 2-worker ``distributed.LocalCluster``.

Prints a markdown table (and writes ``DIR/tuning_bench.json``) with wall seconds, trials per
minute, the ratio to in-process, and the distinct worker processes, plus the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import nano_tfx  # noqa: E402  (first: oneDNN on before TensorFlow is imported)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench import environment  # noqa: E402

MP_ARGS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
ALL_RUNNERS = ("in-process", "quantizer-local", "beam-direct-mp", "beam-dask")


def _log(msg: str) -> None:
    print(f"[tuning_bench] {msg}", file=sys.stderr, flush=True)


def _job(size: int, tmp: str):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), weights=None, classes=10)
    path = os.path.join(tmp, "mobilenetv2")
    model.export(path, verbose=False)
    rng = np.random.default_rng(0)
    x = rng.random((64, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    return path, x, y


def _runner(name: str, tmp: str, cluster_address: str | None):
    from components.quantizer.beam_runner import DASK_RUNNER, BeamTrialRunner
    from nano_tfx.tuning.runner import LocalRunner

    results = os.path.join(tmp, f"results_{name}")
    if name == "in-process":
        return LocalRunner()
    if name == "quantizer-local":
        return BeamTrialRunner(MP_ARGS, results_dir=results)
    if name == "beam-direct-mp":
        return BeamTrialRunner(MP_ARGS, results_dir=results, in_process=False)
    if name == "beam-dask":
        return BeamTrialRunner([f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster_address}"],
                               results_dir=results)
    raise ValueError(f"--runners: unknown runner {name!r}; expected some of {list(ALL_RUNNERS)}")


def run_one(name: str, path: str, x, y, trials: int, tmp: str, cluster_address: str | None) -> dict:
    import shutil

    own = os.path.join(tmp, f"model_{name}")  # a fresh path: no per-process prepare cache is reused
    shutil.copytree(path, own)
    runner = _runner(name, tmp, cluster_address)
    start = time.perf_counter()
    try:
        nano_tfx.quantize(own, accelerator="onnxruntime", calib_dataset=(x, y), metric="sparse_categorical_accuracy",
                          baseline=2.0, max_trials=trials, batch=16, trial_runner=runner,
                          workdir=os.path.join(tmp, f"work_{name}"))
        raise RuntimeError("the unreachable baseline was met")
    except nano_tfx.AccuracyCriterionNotMet as err:
        report = err.report
    wall = time.perf_counter() - start
    ran = [t for t in report.trials if t.status == "ok"]
    return {"runner": name, "wall_s": round(wall, 1), "trials": len(report.trials), "ok": len(ran),
            "trials_per_min": round(60.0 * len(report.trials) / wall, 2),
            "mean_trial_s": round(sum(t.seconds for t in ran) / max(len(ran), 1), 2),
            "parallelism": runner.parallelism, "workers": len({t.worker for t in ran})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--runners", default=",".join(ALL_RUNNERS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.runners.split(",") if n.strip()]
    env = environment()
    env["loadavg_start"] = list(os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuning_bench_") as tmp:
        path, x, y = _job(args.size, tmp)
        cluster = None
        if "beam-dask" in names:
            from distributed import LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        try:
            for name in names:
                _log(f"{name}: {args.trials} trials ...")
                rows.append(run_one(name, path, x, y, args.trials, tmp, cluster.scheduler_address if cluster else None))
                _log(f"{name}: {rows[-1]}")
        finally:
            if cluster is not None:
                cluster.close()
    env["loadavg_end"] = list(os.getloadavg())
    base = next((r["wall_s"] for r in rows if r["runner"] == "in-process"), None)
    for r in rows:
        r["vs_in_process"] = round(r["wall_s"] / base, 2) if base else None
    flags = ", ".join(f"{k}={v}" for k, v in env["cpu_flags"].items())
    lines = [f"MobileNetV2-{args.size} ONNX Runtime INT8, {args.trials} trials; CPU {env['cpu_model']} "
             f"({env['nproc']} cpus): {flags}; load avg {env['loadavg_start']} -> {env['loadavg_end']}",
             "| runner | wall s | trials/min | × in-process | mean trial s | parallelism | worker processes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['runner']} | {r['wall_s']} | {r['trials_per_min']} | {r['vs_in_process']} | "
              f"{r['mean_trial_s']} | {r['parallelism']} | {r['workers']} |" for r in rows]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tuning_bench.json"), "w") as f:
        json.dump({"schema": "nano-tfx-tuning-bench/1", "argv": sys.argv, "env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
