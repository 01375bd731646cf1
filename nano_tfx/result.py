"""``QuantizedModel``: the one face of every result, whatever backend made it.

Callable like a Keras model (returns tensors), ``predict`` (numpy) and ``evaluate`` like Keras,
``save``/``nano_tfx.load`` without the FP32 model, ``report``, ``backend``, ``precision``.
A saved model is a directory: the backend's own files plus ``nano_tfx.json`` (the manifest)
and ``report.json``; it is written beside the target and renamed into place, so a failure
never leaves a half-written model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import BackendOptions, Candidate, TrialConfig, backend_class
from nano_tfx.interchange import TensorInfo

log = logging.getLogger("nano_tfx")

MANIFEST = "nano_tfx.json"
REPORT = "report.json"
FORMAT_VERSION = 1


def write_model_dir(directory: str, candidate: Candidate, inputs: Sequence[TensorInfo],
                    outputs: Sequence[TensorInfo], config: TrialConfig | None, backend: str,
                    report: Any = None, compile_config: dict | None = None) -> None:
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
        "compile": compile_config,
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    if report is not None:
        with open(os.path.join(directory, REPORT), "w") as f:
            f.write(report.to_json())


#: the files each backend's model lives in (named when a saved folder is damaged)
_MODEL_FILES = {"inc": ("int8_graph.pb",), "onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.bin")}


def _damaged(directory: str, name: str, why: Any) -> ValueError:
    # Engines put the useful part anywhere (OpenVINO's first line is just "core.cpp:90:"): keep
    # every line that says something, briefly.
    lines = [ln.strip() for ln in str(why).strip().splitlines() if len(ln.strip().rstrip(":")) > 3]
    text = " / ".join(lines) or type(why).__name__
    return ValueError(f"path: {directory!r} is a damaged nano-tfx model: {name} {text[:400]}")


def read_manifest(directory: str) -> dict:
    """The folder's ``nano_tfx.json``, checked: a clear ``ValueError`` naming the folder and the
    file for anything that is not a manifest this version can read."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"path: {directory!r} is not a nano-tfx model (no {MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(directory, MANIFEST, f"is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise _damaged(directory, MANIFEST, f"holds a {type(manifest).__name__}, expected an object")
    missing = [k for k in ("format", "backend", "inputs", "outputs") if k not in manifest]
    if missing:
        raise _damaged(directory, MANIFEST, f"lacks {missing}")
    version = manifest["format"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(directory, MANIFEST, f"has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"path: {directory!r} was written in nano-tfx model format {version}; this nano-tfx reads "
            f"format {FORMAT_VERSION} and older: upgrade nano-tfx to load it"
        )
    if manifest["backend"] not in _MODEL_FILES:
        raise _damaged(directory, MANIFEST, f"names an unknown backend {manifest['backend']!r}")
    try:
        [TensorInfo.from_dict(t) for t in list(manifest["inputs"]) + list(manifest["outputs"])]
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(directory, MANIFEST, f"has malformed inputs/outputs ({err!r})") from err
    return manifest


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(target: str, write: Callable[[str], None], overwrite: bool = True,
               replaceable: Callable[[str], bool] = is_model_dir) -> None:
    """Run ``write(tmpdir)`` next to ``target``, then swap it into place.

    Only an empty directory or one ``replaceable`` says is ours (a nano-tfx model) is replaced,
    and only with ``overwrite``; anything else at ``target`` is refused untouched. The new folder
    gets the umask's normal mode (not ``mkdtemp``'s 0700: a model server may run as another user).
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"path: expected a directory path for the model, got {target!r}")
    target = os.path.abspath(target)
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise ValueError(f"path: {target!r} exists and is not a directory; nano-tfx saves a model as a directory")
        if os.listdir(target):
            if not replaceable(target):
                raise ValueError(
                    f"path: {target!r} is a non-empty directory that is not a nano-tfx model; "
                    "refusing to replace it (choose a new or empty directory)"
                )
            if not overwrite:
                raise ValueError(f"path: {target!r} already holds a model (pass overwrite=True to replace it)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(target) and os.path.exists(old):
            os.replace(old, target)  # put the previous model back
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


class _RunCandidate(Candidate):
    """Any ``run`` function seen as a candidate (eval_func inside backend-owned tuning)."""

    def __init__(self, run: Callable):
        self.run = run  # type: ignore[method-assign]

    def run(self, inputs):  # pragma: no cover - replaced per instance
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise ValueError("this model view cannot be saved")


#: diagnoses a candidate of this model's backend against its FP32 original on calibration batches
Diagnoser = Callable[[Any, Candidate, int], list]


class QuantizedModel:
    """A quantized (or bf16/fp16) model from any backend, used like a Keras model."""

    _diagnoser: Diagnoser | None = None  # set by nano_tfx.quantize (the tuner knows backend and FP32)

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
        self._compile_config: dict | None = None
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

    @property
    def int8_ops(self) -> dict[str, list[int]] | None:
        """INT8 coverage of this model: ``{"MatMul": [ops in INT8, ops in all], "Conv": [...]}``,
        counted from its graph by its backend (``nano_tfx.coverage``); None when unknown.
        ``{"MatMul": [0, 3], ...}`` means that no compute op runs in INT8 (the model is FP32)."""
        if self.report is not None and getattr(self.report, "int8_ops", None) is not None:
            return {k: list(v) for k, v in self.report.int8_ops.items()}
        try:  # a model loaded without its report: count its graph now
            return self._candidate.int8_ops()
        except Exception as err:  # noqa: BLE001 - coverage informs, it never breaks the model
            log.warning("nano-tfx: INT8 coverage not counted (%s: %s)", type(err).__name__, err)
            return None

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

        How many compute ops run in INT8 at all is ``self.int8_ops`` (counted from the graph,
        no data needed), worded by ``self.report.int8_coverage_text()``; it is logged here too.
        """
        from nano_tfx.data import make_batches

        diagnoser = self._diagnoser
        if diagnoser is None:
            raise ValueError("self: diagnose needs the FP32 original; expected a model returned by "
                             "nano_tfx.quantize in this process, got one loaded from disk")
        if data is None:
            raise ValueError("data: expected model inputs (arrays, a dataset or (x, y)), got None")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples: expected a positive int, got {max_samples!r}")
        x = data[0] if isinstance(data, tuple) and len(data) == 2 and self._single_input else data
        batches = make_batches(x, self.inputs, sample_size=max_samples, argument="data").calibration()
        from nano_tfx.coverage import coverage_text

        # The per-layer rows cannot say which compute ops run in INT8 at all: the log line does.
        coverage = coverage_text(self.int8_ops, self.precision)
        if coverage:
            log.info("nano-tfx: %s/%s: %s", self.backend, self.precision, coverage)
        return diagnoser(batches, self._candidate, max_samples)

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
        """Set what ``evaluate`` reports (like Keras; optimizer arguments are ignored). Kept by
        ``save``/``load`` as Keras configs; an object Keras cannot serialise is dropped from the
        saved model with a warning."""
        from nano_tfx.metrics import make_evaluator

        metrics = list(metrics or [])
        self._metrics = [make_evaluator(m) for m in metrics]
        self._loss = loss
        self._compile_config = {"loss": compile_entry(loss, "loss"),
                                "metrics": [e for e in (compile_entry(m, "metric") for m in metrics) if e is not None]}

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
    def save(self, path: str, overwrite: bool = True) -> None:
        """Write the model to the directory ``path``; ``nano_tfx.load(path)`` reads it back.

        Args:
            path: a new or empty directory, or one holding a nano-tfx model (replaced atomically
                when ``overwrite``). Anything else there is refused with a ``ValueError`` and left
                untouched.
            overwrite: replace a nano-tfx model already at ``path`` (Keras' default, True).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path: expected a directory path, got {type(path).__name__}")
        atomic_dir(os.fspath(path), lambda tmp: write_model_dir(
            tmp, self._candidate, self.inputs, self.outputs, self.config, self.backend, self.report,
            compile_config=self._compile_config), overwrite=overwrite)


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
    """Load a model written by ``QuantizedModel.save`` — no FP32 model needed.

    Args:
        path: the model directory.
        thread_num: inference threads (ONNX Runtime, OpenVINO, TensorFlow session).
        onnxruntime_session_options: an ``onnxruntime.SessionOptions`` for ONNX Runtime models.
        openvino_config: OpenVINO compile properties for OpenVINO models.

    Returns:
        The ``QuantizedModel``, compiled with the loss/metrics it was saved with.

    Raises:
        ValueError: ``path`` is not a nano-tfx model, or names the damaged file of one.
    """
    from nano_tfx.report import Report

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path: expected a model directory, got {path!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory (a nano-tfx model is one)")
    manifest = read_manifest(path)
    options = BackendOptions(thread_num=thread_num, onnxruntime_session_options=onnxruntime_session_options,
                             openvino_config=openvino_config)
    backend = backend_class(manifest["backend"])(options)
    files = _MODEL_FILES[manifest["backend"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise _damaged(path, missing[0], "is missing")
    try:
        candidate = backend.load(path, manifest)
    except Exception as err:  # noqa: BLE001 - whatever the engine says, name the folder and file
        raise _damaged(path, " / ".join(files), f"cannot be loaded by {manifest['backend']}: {err}") from err
    report = None
    report_path = os.path.join(path, REPORT)
    if os.path.isfile(report_path):
        try:
            report = Report.load(report_path)
        except Exception as err:  # noqa: BLE001 - the report is not needed to run the model
            log.warning("nano-tfx: %s is damaged (%s); the model loads without its report", report_path, err)
    try:
        config = TrialConfig.from_dict(manifest["config"]) if manifest.get("config") else None
    except (AttributeError, TypeError, ValueError) as err:
        raise _damaged(path, MANIFEST, f"has a malformed config ({err!r})") from err
    model = QuantizedModel(
        candidate, report=report, config=config, backend=manifest["backend"],
        inputs=[TensorInfo.from_dict(t) for t in manifest["inputs"]],
        outputs=[TensorInfo.from_dict(t) for t in manifest["outputs"]],
    )
    compiled = manifest.get("compile") or {}
    if compiled:
        model.compile(loss=_from_entry(compiled.get("loss"), "loss"),
                      metrics=[m for m in (_from_entry(e, "metric") for e in compiled.get("metrics") or []) if m is not None])
    return model


# -- compile configuration across save/load (Keras configs, never pickles) ----------------------
def _keras_module(flavor: str):
    import importlib

    return importlib.import_module("tf_keras" if flavor == "tf_keras" else "keras")


def _flavor(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    if not module.startswith("tf_keras"):
        module = type(obj).__module__ or ""
    return "tf_keras" if module.startswith("tf_keras") else "keras"


def _from_entry(entry: Any, kind: str) -> Any:
    """A saved loss/metric entry → the object (a name stays a name)."""
    if entry is None or isinstance(entry, str):
        return entry
    keras = _keras_module(entry.get("flavor", "keras"))
    try:
        return (keras.losses if kind == "loss" else keras.metrics).deserialize(entry["config"])
    except Exception as err:  # noqa: BLE001 - a custom object not importable here
        log.warning("nano-tfx: the saved %s %s cannot be rebuilt here (%s); evaluate() goes without it",
                    kind, entry.get("config"), err)
        return None


def compile_entry(obj: Any, kind: str, flavor: str | None = None) -> Any:
    """A loss/metric as JSON: a name stays a name, a Keras object becomes its Keras config (checked
    to load back). What cannot be serialised is dropped with a warning, never a crash."""
    from nano_tfx.metrics import Evaluator

    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Mapping) and "class_name" in obj:  # already a Keras config (compile config)
        entry = {"flavor": flavor or "keras", "config": dict(obj)}
    elif isinstance(obj, Evaluator) and hasattr(obj, "metric"):
        return compile_entry(obj.metric, kind)
    else:
        flavor = flavor or _flavor(obj)
        qualname = getattr(obj, "__qualname__", "") or ""
        try:
            if qualname == "<lambda>" or "<locals>" in qualname:
                raise ValueError("a lambda or local function has no importable name")
            entry = {"flavor": flavor, "config": _keras_module(flavor).saving.serialize_keras_object(obj)}
            json.dumps(entry)
        except Exception as err:  # noqa: BLE001
            log.warning("nano-tfx: the %s %r cannot be saved with the model (%s); a loaded model evaluates "
                        "without it - compile() it again after load", kind, obj, err)
            return None
    if _from_entry(entry, kind) is None:
        return None
    return entry
