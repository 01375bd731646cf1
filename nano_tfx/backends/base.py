"""The one interface every quantization backend implements.

A backend turns the interchange form (a SavedModel + signature, see ``nano_tfx.interchange``)
into runnable candidates. The tuner (``nano_tfx.tuning``) never looks inside a backend: it asks
for a search space, runs ``quantize`` once per trial config and evaluates the returned
``Candidate`` itself. Everything crossing this boundary is plain data (numpy arrays, dicts,
paths), which is what lets trials run in-process or as Beam work.
"""
from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from nano_tfx.cpu import cpu_has_vnni  # noqa: F401 - re-exported (the backends' knob)
from nano_tfx.interchange import SavedModelSource

#: the engine's own FP32 model as a rung of ``precision='auto'``: no quantization, ``fp32_candidate``
FP32 = "fp32"
#: INT8 with the layers kept out of INT8 in BF16 instead of FP32 (a TrialConfig knob of INT8
#: trials, value "bf16"; the candidate's precision is then ``INT8_BF16``)
FALLBACK_PRECISION = "fallback_precision"
INT8_BF16 = "int8+bf16"


#: SmoothQuant (a TrialConfig knob of static INT8 trials): the alpha of the per-input-channel
#: smoothing applied before calibration (activation / s, weight row * s with
#: s = max|x|^alpha / max|w|^(1 - alpha)), or None: no smoothing. Each backend applies its own
#: library's implementation (``SMOOTHING_BY``).
SMOOTH_QUANT = "smooth_quant"
#: whose SmoothQuant each backend applies (what the report names)
SMOOTHING_BY = {
    "onnxruntime": "neural-compressor ORTSmoothQuant via onnxruntime.quantization extra_options",
    "openvino": "NNCF SmoothQuant (ModelType.TRANSFORMER, smooth_quant_alphas.matmul)",
    "inc": "INC TensorFlow smooth_quant recipe",
}


def smooth_quant_alpha(config: "TrialConfig") -> float | None:
    """The config's SmoothQuant alpha, None when smoothing is off; a clear error otherwise."""
    value = config.knob(SMOOTH_QUANT)
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{SMOOTH_QUANT}: expected None (off) or an alpha in [0, 1], got {value!r}")
    return float(value)


def smoothing_text(config: Mapping[str, Any] | "TrialConfig" | None, backend: str | None) -> str | None:
    """"SmoothQuant alpha=0.5 (<library>)" for a trial config (``TrialConfig`` or its dict), None
    when it applied no smoothing."""
    if config is None:
        return None
    knobs = dict(config.knobs) if isinstance(config, TrialConfig) else dict(config.get("knobs") or {})
    alpha = knobs.get(SMOOTH_QUANT)
    if alpha is None or alpha is False:
        return None
    by = SMOOTHING_BY.get(backend or "")
    return f"SmoothQuant alpha={alpha:g}" + (f" ({by})" if by else "")


def trial_precision(precision: str, config: "TrialConfig") -> str:
    """What a trial of ``precision`` with ``config`` runs in: "int8+bf16" for an INT8 trial whose
    fallback layers run in BF16, else ``precision`` (the label in reports and manifests)."""
    return INT8_BF16 if precision == "int8" and config.knob(FALLBACK_PRECISION) == "bf16" else precision


@dataclass(frozen=True)
class TrialConfig:
    """One point of a backend's search space: global knobs plus ops kept in FP32.

    ``knobs`` maps a knob name to its value (e.g. ``{"calibration": "minmax"}``); ``fallback``
    names the graph nodes the backend must leave un-quantized. Frozen and hashable so that a
    finished trial can be found again by ``key()`` (resume, de-duplication).
    """

    knobs: tuple[tuple[str, Any], ...] = ()
    fallback: tuple[str, ...] = ()

    @staticmethod
    def make(knobs: Mapping[str, Any] | None = None, fallback: Iterable[str] = ()) -> "TrialConfig":
        return TrialConfig(tuple(sorted((knobs or {}).items())), tuple(sorted(set(fallback))))

    def knob(self, name: str, default: Any = None) -> Any:
        return dict(self.knobs).get(name, default)

    def to_dict(self) -> dict:
        return {"knobs": dict(self.knobs), "fallback": list(self.fallback)}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TrialConfig":
        return TrialConfig.make(data.get("knobs"), data.get("fallback", ()))

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


@dataclass(frozen=True)
class SearchSpace:
    """What a backend can vary. The first value of every knob is its default.

    ``fallback_candidates`` are node names that may be kept in FP32, in the backend's preferred
    order (most likely to hurt accuracy first, when the backend knows).
    """

    knobs: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fallback_candidates: Sequence[str] = ()
    #: knob values the sensitivity-guided default strategy uses instead of the defaults
    guided: Mapping[str, Any] = field(default_factory=dict)
    #: knob changes, most promising first, that the default strategy tries on top of its best
    #: config once falling layers back has paid off: after the culprit layers, what is left is
    #: the error every layer adds a little of, which a finer setting (8-bit weights, exact
    #: activation ranges) removes everywhere at once and a further FP32 layer only locally
    refinements: Sequence[Mapping[str, Any]] = ()
    #: knob changes (SmoothQuant alphas, mildest first) the default strategy tries on the fully
    #: quantized config as soon as it misses and its diagnosis shows activation outlier
    #: channels, before any layer goes to FP32: smoothing fixes every outlier-fed layer at once
    smoothing: Sequence[Mapping[str, Any]] = ()

    def default(self) -> TrialConfig:
        return TrialConfig.make({k: v[0] for k, v in self.knobs.items() if v})


class Candidate(abc.ABC):
    """A runnable model produced by a backend: FP32 reference or a quantized trial result."""

    backend: str = ""
    precision: str = ""

    @abc.abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one batch. ``inputs`` follow ``source.inputs`` order; outputs follow ``source.outputs``."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Write the backend's files into ``directory`` (exists and is empty)."""

    def size_bytes(self, directory: str | None = None) -> int | None:
        """Serialized size, when known (benchmarks and reports)."""
        return None

    def manifest_info(self) -> dict:
        """Extra JSON-able facts ``Backend.load`` needs (stored as manifest["backend_info"])."""
        return {}

    def int8_ops(self) -> dict[str, list[int]] | None:
        """INT8 coverage counted from this candidate's own graph by its backend:
        ``{kind: [ops running in INT8, ops of that kind]}`` with the kinds of
        ``nano_tfx.coverage`` ("MatMul", "Conv", maybe "Attention"); None when unknown."""
        return None


@dataclass
class AccuracyContext:
    """What a backend that tunes internally (e.g. NNCF accuracy control) needs to judge a model.

    ``evaluate(run_fn)`` returns the user's metric for any ``run_fn(inputs) -> outputs``;
    ``baseline`` is the FP32 metric; the criterion's drop type and bound are given as plain
    values so the backend can map them to its own API.
    """

    evaluate: Callable[[Callable[[Sequence[np.ndarray]], list[np.ndarray]]], float]
    baseline: float
    max_drop: float
    drop_type: str  # "relative" | "absolute"
    higher_is_better: bool
    eval_batches: Callable[[], Iterator[tuple[list[np.ndarray], Any]]] | None = None
    evaluations: int = 0  # metric evaluations made through ``evaluate`` (counted honestly)


@dataclass(frozen=True)
class BackendOptions:
    """Runtime options shared by the public API and passed to every backend unchanged."""

    thread_num: int | None = None
    method: str | None = None  # onnxruntime: 'qlinear' (QOperator) | 'integer' (QDQ-integer ops)
    onnxruntime_session_options: Any = None
    openvino_config: Mapping[str, Any] | None = None
    approach: str = "static"
    extra: Mapping[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """A quantization engine behind the common interface.

    Lifecycle per ``quantize()`` call: ``validate`` (cheap, before any work) → ``prepare``
    (once: conversion, graph inspection) → ``search_space`` → ``quantize`` per trial → the
    chosen candidate is saved with ``Candidate.save`` and read back with ``load``.

    The duties, each in its own module of the backend's package (``backends/<name>/``):
    ``prepare`` (convert), ``search_space`` (space), ``quantize``, ``diagnose`` (per-layer
    error of a quantized candidate against FP32, in the names ``TrialConfig.fallback`` accepts),
    ``coverage`` (``Candidate.int8_ops``: the compute ops running in INT8, counted in the
    candidate's own graph), ``load``.
    """

    name: str = ""
    #: precision → approaches allowed for it (e.g. {"int8": ("static",), "bf16": ()})
    precisions: Mapping[str, tuple[str, ...]] = {}

    def __init__(self, options: BackendOptions | None = None):
        self.options = options or BackendOptions()

    def validate(self, precision: str, approach: str) -> None:
        """Raise ``ValueError`` naming the argument when this backend can't do the request."""
        if precision == FP32:  # every engine runs its own FP32 model (``fp32_candidate``)
            return
        if precision not in self.precisions:
            raise ValueError(
                f"precision: accelerator={self.accelerator_name()!r} supports "
                f"{sorted(self.precisions)}, got {precision!r}"
            )
        allowed = self.precisions[precision]
        if allowed and approach not in allowed:
            raise ValueError(
                f"approach: accelerator={self.accelerator_name()!r} with precision={precision!r} "
                f"supports {list(allowed)}, got {approach!r}"
            )

    def accelerator_name(self) -> str | None:
        return None if self.name == "inc" else self.name

    @abc.abstractmethod
    def prepare(self, source: SavedModelSource, workdir: str) -> Any:
        """Convert/inspect the source once; the returned object is passed to every trial."""

    @abc.abstractmethod
    def search_space(self, prepared: Any, precision: str, approach: str) -> SearchSpace:
        """The knobs and fallback candidates this backend can tune for the request."""

    @abc.abstractmethod
    def quantize(
        self,
        prepared: Any,
        precision: str,
        config: TrialConfig,
        calibration: "CalibrationData | None",
        accuracy: AccuracyContext | None = None,
    ) -> Candidate:
        """Produce one candidate. ``calibration`` is None for dynamic/bf16/fp16 requests."""

    def space(self, prepared: Any, precision: str, approach: str) -> SearchSpace:
        """``search_space``, and the empty one of the FP32 rung (nothing to tune)."""
        return SearchSpace() if precision == FP32 else self.search_space(prepared, precision, approach)

    def build(self, prepared: Any, precision: str, config: TrialConfig, calibration: "CalibrationData | None",
              accuracy: AccuracyContext | None = None) -> Candidate:
        """One trial's candidate: ``quantize``, or the engine's own FP32 model for the FP32 rung."""
        if precision == FP32:
            return self.fp32_candidate(prepared)
        return self.quantize(prepared, precision, config, calibration, accuracy)

    def bf16_fallback(self, config: TrialConfig | None = None) -> str | None:
        """Why this engine can't run an INT8 model's fallback layers in BF16 (None: it can, with
        the ``FALLBACK_PRECISION`` knob); with ``config``, why it would not pay for that INT8
        config. The CPU's BF16 is judged by the ladder (``nano_tfx.cpu``), not here."""
        return f"{self.name}: no BF16 fallback layers"

    @abc.abstractmethod
    def load(self, directory: str, manifest: Mapping[str, Any]) -> Candidate:
        """Load a candidate saved by ``Candidate.save`` (no FP32 model needed)."""

    def fp32_candidate(self, prepared: Any) -> Candidate:
        """This engine's FP32 model, built from what ``prepare`` already made (no second
        conversion): what a result's ``int8_gain`` divides by, so the engine's own speed-up over
        TensorFlow is told apart from what INT8 adds. ``NotImplementedError``: gain not reported."""
        raise NotImplementedError(f"backend {self.name!r} has no FP32 candidate")

    def diagnose(self, prepared: Any, candidate: Candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
        """Per quantized layer: the error of its output against the FP32 model's same tensor on
        ``batches`` (lists of input arrays). Returns ``nano_tfx.diagnosis.layer_stats`` dicts
        ranked worst first (``nano_tfx.diagnosis.rank``); names are valid fallback names."""
        raise NotImplementedError(f"backend {self.name!r} has no per-layer diagnosis")

    def describe(self) -> dict:
        return {"backend": self.name}


class CalibrationData(abc.ABC):
    """Re-iterable stream of input batches, already cast to the model's dtypes and capped at
    the requested number of samples. Each batch is a list of arrays in ``source.inputs`` order."""

    batch_size: int = 1
    num_samples: int | None = None

    @abc.abstractmethod
    def __iter__(self) -> Iterator[list[np.ndarray]]:
        ...


_REGISTRY: dict[str, Callable[[BackendOptions], Backend]] = {}
# Backends import heavy libraries: load a backend's module only when it is asked for.
_MODULES = {
    "inc": "nano_tfx.backends.inc",
    "onnxruntime": "nano_tfx.backends.onnxruntime",
    "openvino": "nano_tfx.backends.openvino",
}


def register(accelerator: str | None):
    """Class decorator: make a backend reachable by its ``accelerator`` name (None = INC)."""

    def wrap(cls):
        _REGISTRY[accelerator or "inc"] = cls
        return cls

    return wrap


def backend_names() -> list[str]:
    return list(_MODULES)


def backend_class(name: str | None) -> Callable[[BackendOptions], Backend]:
    """The backend class for a registry key / accelerator name (None = INC)."""
    import importlib

    key = name or "inc"
    if key not in _REGISTRY and key in _MODULES:
        importlib.import_module(_MODULES[key])
    if key not in _REGISTRY:
        raise ValueError(f"accelerator: unknown backend {name!r}; expected one of {backend_names()}")
    return _REGISTRY[key]


def registered() -> dict[str, Callable[[BackendOptions], Backend]]:
    """All backends, importing each module on first use."""
    return {name: backend_class(name) for name in _MODULES}
