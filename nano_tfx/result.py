"""``QuantizedModel``: the one face of every result, whatever backend made it.

Callable like a Keras model (returns tensors), ``predict`` (numpy) and ``evaluate`` like Keras,
``save``/``nano_tfx.load`` without the FP32 model, ``report``, ``backend``, ``precision``.
A saved model is a directory: the backend's own files plus ``nano_tfx.json`` (the manifest)
and ``report.json``; it is written beside the target and renamed into place, so a failure
never leaves a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import BackendOptions, Candidate, TrialConfig, backend_class
from nano_tfx.interchange import TensorInfo

MANIFEST = "nano_tfx.json"
REPORT = "report.json"
FORMAT_VERSION = 1


def write_model_dir(directory: str, candidate: Candidate, inputs: Sequence[TensorInfo],
                    outputs: Sequence[TensorInfo], config: TrialConfig | None, backend: str,
                    report: Any = None) -> None:
    """Backend files + manifest (+ report) into an existing empty ``directory``."""
    os.makedirs(directory, exist_ok=True)
    candidate.save(directory)
    manifest = {
        "format": FORMAT_VERSION,
        "backend": backend,
        "precision": candidate.precision,
        "inputs": [t.to_dict() for t in inputs],
        "outputs": [t.to_dict() for t in outputs],
        "config": config.to_dict() if config else None,
        "backend_info": candidate.manifest_info(),
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    if report is not None:
        with open(os.path.join(directory, REPORT), "w") as f:
            f.write(report.to_json())


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"path: {directory!r} is not a nano-tfx model (no {MANIFEST})")
    with open(path) as f:
        return json.load(f)


def atomic_dir(target: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmpdir)`` next to ``target``, then swap it into place."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        write(tmp)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _RunCandidate(Candidate):
    """Any ``run`` function seen as a candidate (eval_func inside backend-owned tuning)."""

    def __init__(self, run: Callable):
        self.run = run  # type: ignore[method-assign]

    def run(self, inputs):  # pragma: no cover - replaced per instance
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise ValueError("this model view cannot be saved")


class QuantizedModel:
    """A quantized (or bf16/fp16) model from any backend, used like a Keras model."""

    def __init__(self, candidate: Candidate, source: Any = None, report: Any = None,
                 config: TrialConfig | None = None, backend: str | None = None,
                 inputs: Sequence[TensorInfo] | None = None, outputs: Sequence[TensorInfo] | None = None,
                 workdir: str | None = None):
        self._candidate = candidate
        self.inputs = tuple(inputs if inputs is not None else source.inputs)
        self.outputs = tuple(outputs if outputs is not None else source.outputs)
        self.report = report
        self.config = config
        self.backend = backend or candidate.backend
        self.precision = candidate.precision
        self._loss = None
        self._metrics: list = []
        self._single_input = len(self.inputs) == 1
        self._dtypes = [np.dtype(t.dtype) if t.dtype != "object" else None for t in self.inputs]
        if workdir:  # temporary trial files live as long as this object
            weakref.finalize(self, shutil.rmtree, workdir, True)

    @staticmethod
    def from_run(run: Callable, source: Any) -> "QuantizedModel":
        return QuantizedModel(_RunCandidate(run), source)

    def __repr__(self) -> str:
        return f"<QuantizedModel backend={self.backend} precision={self.precision} inputs={[t.name for t in self.inputs]}>"

    # -- running ---------------------------------------------------------------------------
    @property
    def candidate(self) -> Candidate:
        return self._candidate

    def _as_inputs(self, x: Any) -> list[np.ndarray]:
        if isinstance(x, Mapping):
            arrays = [x[t.name] for t in self.inputs] if all(t.name in x for t in self.inputs) else list(x.values())
        elif isinstance(x, (list, tuple)) and not self._single_input:
            arrays = list(x)
        else:
            arrays = [x]
        out = []
        for a, info, dtype in zip(arrays, self.inputs, self._dtypes):
            a = a.numpy() if hasattr(a, "numpy") and not isinstance(a, np.ndarray) else np.asarray(a)
            if a.ndim == len(info.shape) - 1:
                a = a[None]
            if a.ndim != len(info.shape) or any(
                w is not None and w != g for w, g in zip(info.shape[1:], a.shape[1:])
            ):
                raise ValueError(f"x: input {info.name!r} expects shape {tuple(info.shape)}, got {a.shape}")
            if dtype is not None and a.dtype != dtype:
                a = a.astype(dtype)
            out.append(a)
        if len(out) != len(self.inputs):
            raise ValueError(f"x: the model takes {len(self.inputs)} inputs, got {len(out)}")
        return out

    def diagnose(self, data: Any, max_samples: int = 256) -> list[dict]:
        """Per-layer quantization error of this model against its FP32 original on ``data``.

        Args:
            data: model inputs (an array, a list/dict of arrays, a ``tf.data.Dataset``, or an
                ``(x, y)`` tuple whose labels are ignored); at most ``max_samples`` rows are used.
            max_samples: rows to run through both models.

        Returns:
            One dict per quantized layer, worst first: ``name`` (the backend's fallback name,
            containing the Keras layer name where the interchange keeps it), ``sqnr_db``, ``mse``
            (relative), ``added_mse`` (error the layer itself adds: the ranking key),
            ``drop_db``, ``fp32_min``/``fp32_max``, ``outlier_ratio``, ``range_ratio``.
            See ``nano_tfx.diagnosis``.
        """
        from nano_tfx.data import make_batches
        from nano_tfx.tuning.runner import TrialJob, diagnose_trial

        job = getattr(self, "_job", None)
        if job is None:
            raise ValueError("self: diagnose needs the FP32 original; expected a model returned by "
                             "nano_tfx.quantize in this process, got one loaded from disk")
        if data is None:
            raise ValueError("data: expected model inputs (arrays, a dataset or (x, y)), got None")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples: expected a positive int, got {max_samples!r}")
        x = data[0] if isinstance(data, tuple) and len(data) == 2 and self._single_input else data
        batches = make_batches(x, self.inputs, sample_size=max_samples, argument="data").calibration()
        from dataclasses import replace

        return diagnose_trial(replace(job, calibration=batches), self._candidate, max_samples)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Raw batch in, raw outputs out (input order; no conversion)."""
        return self._candidate.run(inputs)

    def __call__(self, x: Any, training: bool = False, **kwargs: Any) -> Any:
        """Like ``keras.Model.__call__``: tensor(s) out."""
        import tensorflow as tf

        outs = self._candidate.run(self._as_inputs(x))
        tensors = [tf.convert_to_tensor(o) for o in outs]
        return tensors[0] if len(tensors) == 1 else tensors

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = 0, steps: int | None = None,
                **kwargs: Any) -> Any:
        """Like ``keras.Model.predict``: numpy array(s) over arrays, datasets or generators."""
        from nano_tfx.data import make_batches

        batches = make_batches(x, self.inputs, batch=batch_size or (None if _is_batched_source(x) else 32),
                               argument="x")
        parts: list[list[np.ndarray]] = []
        for i, (xs, _) in enumerate(batches):
            if steps is not None and i >= steps:
                break
            parts.append(self._candidate.run(xs))
        outs = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
        return outs[0] if len(outs) == 1 else outs

    # -- evaluation ------------------------------------------------------------------------
    def compile(self, loss: Any = None, metrics: Any = None, **kwargs: Any) -> None:
        """Set what ``evaluate`` reports (like Keras; optimizer arguments are ignored)."""
        from nano_tfx.metrics import make_evaluator

        self._loss = loss
        self._metrics = [make_evaluator(m) for m in (metrics or [])]

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: Any = 0,
                 metric: Any = None, return_dict: bool = False, **kwargs: Any) -> Any:
        """Like ``keras.Model.evaluate``: ``[loss, *metrics]`` (a scalar when there is one value)."""
        from nano_tfx.data import make_batches
        from nano_tfx.metrics import CallableMetric, make_evaluator

        batches = make_batches(x, self.inputs, y=y, batch=batch_size or (None if _is_batched_source(x) else 32),
                               argument="x")
        evaluators: list = []
        if self._loss is not None:
            loss = _loss_fn(self._loss)
            evaluators.append(("loss", _MeanLoss(loss)))
        for m in ([make_evaluator(metric)] if metric is not None else self._metrics):
            evaluators.append((m.name, m))
        if not evaluators:
            raise ValueError("evaluate: no loss or metric; call compile(loss=..., metrics=[...]) or pass metric=")
        values = {name: ev.evaluate(self._candidate.run, batches, model=self) for name, ev in evaluators}
        if return_dict:
            return values
        flat = list(values.values())
        return flat[0] if len(flat) == 1 else flat

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the model to ``path`` (replaced atomically); ``nano_tfx.load(path)`` reads it."""
        atomic_dir(os.fspath(path), lambda tmp: write_model_dir(
            tmp, self._candidate, self.inputs, self.outputs, self.config, self.backend, self.report))


def _is_batched_source(x: Any) -> bool:
    return hasattr(x, "element_spec") or callable(x) or hasattr(x, "__next__")


def _loss_fn(loss: Any) -> Callable:
    if callable(loss):
        return loss
    import keras

    return keras.losses.get(loss)


class _MeanLoss:
    name = "loss"

    def __init__(self, fn: Callable):
        self.fn = fn

    def evaluate(self, run, data, model=None) -> float:
        total, count = 0.0, 0
        for xs, y in data:
            outs = run(xs)
            value = self.fn(y, outs[0] if len(outs) == 1 else outs)
            value = float(np.mean(value.numpy() if hasattr(value, "numpy") else value))
            total += value * len(xs[0])
            count += len(xs[0])
        return total / max(count, 1)


def load(path: str, thread_num: int | None = None, onnxruntime_session_options: Any = None,
         openvino_config: Mapping[str, Any] | None = None) -> QuantizedModel:
    """Load a model written by ``QuantizedModel.save`` — no FP32 model needed."""
    from nano_tfx.report import Report

    path = os.fspath(path)
    manifest = read_manifest(path)
    options = BackendOptions(thread_num=thread_num, onnxruntime_session_options=onnxruntime_session_options,
                             openvino_config=openvino_config)
    backend = backend_class(manifest["backend"])(options)
    candidate = backend.load(path, manifest)
    report_path = os.path.join(path, REPORT)
    report = Report.load(report_path) if os.path.isfile(report_path) else None
    config = TrialConfig.from_dict(manifest["config"]) if manifest.get("config") else None
    return QuantizedModel(
        candidate, report=report, config=config, backend=manifest["backend"],
        inputs=[TensorInfo.from_dict(t) for t in manifest["inputs"]],
        outputs=[TensorInfo.from_dict(t) for t in manifest["outputs"]],
    )
