"""ONNX Runtime backend: SavedModel → ONNX (tf2onnx) → INT8 with ``onnxruntime.quantization``.

Lifecycle (see ``nano_tfx.backends.base``):

* ``prepare``: tf2onnx converts the source signature to ONNX (input/output names kept equal to
  ``source.input_names`` / ``source.output_names``), then ``quant_pre_process`` (symbolic shape
  inference + ORT basic graph optimisation); on a transformer encoder (MatMuls of two
  activations) also ``onnxruntime.transformers`` fusion, kept only when FP32-equal and not slower
  (``convert._fuse_transformer``). The result is an :class:`OrtPrepared` — plain, picklable data
  (paths + node lists), so trials may run in other processes.
* ``search_space``: static INT8 knobs ``format`` (QDQ), ``activation_type`` (uint8),
  ``per_channel`` (True), ``calibrate_method`` (MinMax) (+ ``reduce_range`` (True) on x86 CPUs
  without VNNI); dynamic INT8 knobs ``per_channel``, ``weight_type``, ``quantize_conv``
  (+ ``reduce_range``); fp16 has no knobs. On an encoder the static space's ``approach`` knob is
  ``["dynamic", "static"]`` or the reverse, the faster at batch 1 first (``probe_approaches``). Every config also carries its ``approach``. Fallback
  candidates are the weighted nodes (Conv, MatMul, Gemm, ...) of the pre-processed graph: first
  and last such node, then by weight-range spread across output channels.
* fp16: ``onnxruntime.transformers.float16`` (weights and compute graph fp16, IO kept fp32).
  Runs on ORT CPU, but x86 has few fp16 kernels, so ORT inserts Casts: smaller, not faster.
* ``quantize``: one ONNX file per trial under ``<workdir>/onnxruntime/trials``; returns an
  :class:`OrtCandidate` (an ``InferenceSession`` + pre-built name lists).

``BackendOptions.method``: ``'qlinear'`` pins the QOperator format (static only), ``'integer'``
pins IntegerOps (ConvInteger/MatMulInteger = ORT dynamic quantization, so approach='dynamic'),
``None`` tunes the format (QDQ first).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import (
    FP32,
    AccuracyContext,
    Backend,
    CalibrationData,
    Candidate,
    SMOOTH_QUANT,
    SearchSpace,
    TrialConfig,
    register,
    smooth_quant_alpha,
)
from nano_tfx.backends.onnxruntime.convert import (
    OrtPrepared, _activation_matmuls, _convert_to_onnx, _fuse_transformer, _preprocess, _weight_spread,
    gemm_as_matmul, synthetic_feeds, time_sessions,
)
from nano_tfx.backends.onnxruntime.convert import activation_row_bytes
from nano_tfx.backends.onnxruntime.quantize import _calibration_reader
from nano_tfx.backends.onnxruntime.space import (
    _OPSET_RANGE, ACTIVATION_TYPES, CALIBRATE_METHODS, DEFAULT_OPSET, DYNAMIC_WEIGHTED_OPS, FORMATS,
    FP16_WEIGHTED_OPS, FP32_OP_TYPES, KNOBS, METHODS, SMOOTH_QUANT_ALPHAS, STATIC_WEIGHTED_OPS, WEIGHT_TYPES, _order_by_sensitivity, cpu_has_vnni,
)
from nano_tfx.interchange import SavedModelSource, TensorInfo

logger = logging.getLogger("nano_tfx.backends.onnxruntime")

MODEL_FILE = "model.onnx"

# --------------------------------------------------------------------------------------------
# Candidate
# --------------------------------------------------------------------------------------------


class OrtCandidate(Candidate):
    """An ONNX Runtime ``InferenceSession`` over one model file.

    ``run`` is a direct ``sess.run(output_names, {name: array})`` with both name lists built once.
    A candidate from ``quantize`` owns its trial directory and deletes it when garbage-collected
    (keep a reference until ``save``). Pickling ships the model bytes and rebuilds the session.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model_path: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        precision: str,
        session_options: Any = None,
        config: TrialConfig | None = None,
    ):
        self.model_path = model_path
        self.precision = precision
        self.config = config
        self.input_names = tuple(input_names)
        self.output_names = list(output_names)
        self._session_options = session_options
        self._build(model_path)

    def _build(self, model: str | bytes) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            model, sess_options=self._session_options, providers=["CPUExecutionProvider"]
        )
        self._sess_run = self.session.run
        names = self.input_names
        if len(names) == 1:
            only = names[0]
            out = self.output_names
            sess_run = self._sess_run

            def run(inputs, _only=only, _out=out, _run=sess_run):
                return _run(_out, {_only: inputs[0]})

        else:
            out = self.output_names
            sess_run = self._sess_run

            def run(inputs, _names=names, _out=out, _run=sess_run):
                return _run(_out, dict(zip(_names, inputs)))

        # Instance attribute shadows the method: one Python call frame per batch.
        self.run = run  # type: ignore[method-assign]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:  # replaced in _build
        return self._sess_run(self.output_names, dict(zip(self.input_names, inputs)))

    def _own(self, path: str) -> None:
        """Delete ``path`` (this trial's directory/file) when the candidate is garbage-collected,
        so a long tuning run doesn't pile up one model file per trial."""
        remove = shutil.rmtree if os.path.isdir(path) else os.remove
        self._finalizer = weakref.finalize(self, _quiet, remove, path)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.model_path, os.path.join(directory, MODEL_FILE))

    def size_bytes(self, directory: str | None = None) -> int | None:
        path = os.path.join(directory, MODEL_FILE) if directory else self.model_path
        try:
            return os.path.getsize(path)
        except OSError:
            return None

    def int8_ops(self) -> dict[str, list[int]] | None:
        # Counted once, from the graph the quantizer wrote (no second session to inspect).
        if getattr(self, "_int8_ops", None) is None:
            from nano_tfx.backends.onnxruntime.coverage import count_file

            self._int8_ops = count_file(self.model_path)
        return {k: list(v) for k, v in self._int8_ops.items()}

    # Pickling: ship the bytes, not the session (InferenceSession can't be pickled).
    def __getstate__(self) -> dict:
        skip = ("session", "_sess_run", "run", "_finalizer")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        with open(self.model_path, "rb") as f:
            state["_model_bytes"] = f.read()
        # SessionOptions isn't picklable: ship its thread count, rebuild the rest as defaults.
        so = self._session_options
        state["_session_options"] = None
        state["_intra_threads"] = so.intra_op_num_threads if so is not None else 0
        return state

    def __setstate__(self, state: dict) -> None:
        import onnxruntime as ort

        model_bytes = state.pop("_model_bytes")
        threads = state.pop("_intra_threads", 0)
        self.__dict__.update(state)
        self._session_options = ort.SessionOptions()
        self._session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session_options.intra_op_num_threads = threads
        # Always a private copy: the sender's trial file may be deleted with the sender.
        fd, self.model_path = tempfile.mkstemp(suffix=".onnx", prefix="ort_candidate_")
        with os.fdopen(fd, "wb") as f:
            f.write(model_bytes)
        self._own(self.model_path)
        self._build(self.model_path)

    def __repr__(self) -> str:
        return f"OrtCandidate(precision={self.precision!r}, model={self.model_path!r})"


def _quiet(fn, path) -> None:
    try:
        fn(path)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


def _refinements(no_vnni: bool, *others: dict) -> tuple[dict, ...]:
    """The default strategy's knob refinements: 8-bit weights first where 7-bit is the default
    (no VNNI: whether the int16 sums really saturate is model-dependent, so it is measured)."""
    return (({"reduce_range": False},) if no_vnni else ()) + tuple(others)


@register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = {"int8": ("static", "dynamic"), "fp16": ()}

    # ---- validation ------------------------------------------------------------------------

    def validate(self, precision: str, approach: str) -> None:
        super().validate(precision, approach)
        method = self.options.method
        if method is None or precision == FP32:  # the FP32 rung: method is INT8's option
            return
        if method not in METHODS:
            raise ValueError(
                f"method: accelerator='onnxruntime' supports {list(METHODS)} or None, got {method!r}"
            )
        if precision != "int8":
            raise ValueError(
                f"method: {method!r} only applies to precision='int8', got precision={precision!r}; "
                f"leave method=None"
            )
        if method == "integer" and approach != "dynamic":
            raise ValueError(
                "method: 'integer' (IntegerOps: ConvInteger/MatMulInteger) is ONNX Runtime dynamic "
                f"quantization; use approach='dynamic', or method='qlinear'/None for approach={approach!r}"
            )
        if method == "qlinear" and approach != "static":
            raise ValueError(
                "method: 'qlinear' (QOperator: QLinearConv/QLinearMatMul) needs calibrated "
                f"activations, i.e. approach='static'; got approach={approach!r} (use method='integer' "
                "or None for dynamic)"
            )

    # ---- prepare ----------------------------------------------------------------------------

    def _opset(self) -> int:
        opset = int((self.options.extra or {}).get("onnx_opset", DEFAULT_OPSET))
        lo, hi = _OPSET_RANGE
        if not lo <= opset <= hi:
            raise ValueError(f"onnx_opset: expected an int in [{lo}, {hi}], got {opset}")
        return opset

    def prepare(self, source: SavedModelSource, workdir: str) -> OrtPrepared:
        import onnx

        opset = self._opset()
        own = os.path.join(os.path.abspath(workdir), "onnxruntime")
        os.makedirs(os.path.join(own, "trials"), exist_ok=True)
        fp32_path = os.path.join(own, "fp32.onnx")
        model_path = os.path.join(own, "fp32_preprocessed.onnx")

        _convert_to_onnx(source, fp32_path, opset)
        converted = onnx.load(fp32_path, load_external_data=False)
        got_in = [i.name for i in converted.graph.input]
        got_out = [o.name for o in converted.graph.output]
        if sorted(got_in) != sorted(source.input_names) or sorted(got_out) != sorted(source.output_names):
            raise RuntimeError(
                f"tf2onnx produced inputs {got_in} / outputs {got_out}, expected "
                f"{source.input_names} / {source.output_names} (signature {source.signature_key!r})"
            )
        del converted

        how = _preprocess(fp32_path, model_path)
        model = onnx.load(model_path)
        attention = _activation_matmuls(model)
        fusion: dict = {}
        if attention:  # a transformer encoder: try ORT's transformer fusions, kept only if FP32-equal and not slower
            fusion = _fuse_transformer(model_path, model_path, self.session_options())
            if fusion.get("applied"):
                model = onnx.load(model_path)
            logger.info("onnxruntime: transformer fusion %s", fusion)
        nodes = [(n.name, n.op_type) for n in model.graph.node]
        spread = _weight_spread(model)
        return OrtPrepared(
            source=source,
            workdir=own,
            fp32_path=fp32_path,
            model_path=model_path,
            preprocessed=how,
            opset=opset,
            input_names=list(source.input_names),
            output_names=list(source.output_names),
            nodes=nodes,
            weight_spread=spread,
            activation_matmuls=attention,
            fusion=fusion,
            activation_row_bytes=activation_row_bytes(model),
        )

    # ---- search space -----------------------------------------------------------------------

    def search_space(self, prepared: OrtPrepared, precision: str, approach: str) -> SearchSpace:
        self.validate(precision, approach)
        method = self.options.method
        # x86 without VNNI runs U8S8 through VPMADDUBSW, whose int16 pair sums saturate with
        # full-range int8 weights (measured: 20x larger error on a random Dense net, worse with
        # per-channel). 7-bit weights (reduce_range) avoid it at the same speed → default there.
        no_vnni = cpu_has_vnni() is False
        if precision == "fp16":
            names = prepared.quantizable(FP16_WEIGHTED_OPS)
            return SearchSpace({}, _order_by_sensitivity(names, prepared.weight_spread))
        if approach == "dynamic":
            knobs: dict[str, list] = {
                "approach": ["dynamic"],
                "per_channel": [False, True],
                "weight_type": list(WEIGHT_TYPES),
            }
            names = prepared.quantizable(DYNAMIC_WEIGHTED_OPS)
            convs = set(prepared.quantizable(("Conv",)))
            if convs:
                # ConvInteger is slower than FP32 Conv on CPU: leaving Conv in FP32 is the default.
                knobs["quantize_conv"] = [False, True]
            if no_vnni:
                knobs["reduce_range"] = [True, False]
            ordered = _order_by_sensitivity([n for n in names if n not in convs], prepared.weight_spread)
            ordered += _order_by_sensitivity([n for n in names if n in convs], prepared.weight_spread)
            return SearchSpace(knobs, ordered, refinements=_refinements(no_vnni, {"per_channel": True}))
        # A transformer encoder (MatMuls of two activations: attention): dynamic INT8 (MatMulInteger)
        # beside static QDQ, the one measured faster on this CPU first (the default); CNNs: static only.
        approaches = ["static"]
        if method is None and prepared.activation_matmuls:
            approaches = self.approach_order(prepared)
        knobs = {
            "approach": approaches,
            "format": ["QOperator"] if method == "qlinear" else list(FORMATS),
            "activation_type": list(ACTIVATION_TYPES),
            "per_channel": [True, False],
            "calibrate_method": list(CALIBRATE_METHODS),
        }
        if no_vnni:
            knobs["reduce_range"] = [True, False]
        smoothing: tuple = ()
        if prepared.quantizable(("MatMul", "Gemm")):  # SmoothQuant smooths Linear-layer inputs
            knobs[SMOOTH_QUANT] = [None, *SMOOTH_QUANT_ALPHAS]
            smoothing = tuple({SMOOTH_QUANT: a} for a in SMOOTH_QUANT_ALPHAS)
        names = prepared.quantizable(STATIC_WEIGHTED_OPS)
        # Percentile (99.999 %) clips rare activation peaks; Entropy is left out (20-60x slower
        # calibration). Measured on the 24-layer planted MLP (AVX2, culprit layers in FP32):
        # top-1 0.887 defaults, 0.893 Percentile, 0.910 8-bit weights (FP32 0.901).
        # (Percentile changes nothing in a dynamic trial: no refinement but 8-bit weights there)
        finer = ({"calibrate_method": "Percentile"},) if approaches[0] == "static" else ()
        return SearchSpace(knobs, _order_by_sensitivity(names, prepared.weight_spread),
                           refinements=_refinements(no_vnni, *finer), smoothing=smoothing)

    def approach_order(self, prepared: OrtPrepared) -> list[str]:
        """``["dynamic", "static"]`` or the reverse: the approach whose default INT8 model ran faster
        at batch 1 in ``probe_approaches`` first (static first when it could not be measured)."""
        if prepared.approach_probe is None:
            prepared.approach_probe = self.probe_approaches(prepared)
        ms = prepared.approach_probe.get("b1_ms") or {}
        if ms.get("dynamic") is not None and ms.get("static") is not None and ms["dynamic"] < ms["static"]:
            return ["dynamic", "static"]
        return ["static", "dynamic"]

    def probe_approaches(self, prepared: OrtPrepared) -> dict:
        """Static QDQ vs dynamic INT8, each fully quantized with its default knobs, timed at batch 1
        side by side (interleaved rounds) on synthetic inputs: which INT8 kernels are faster depends
        on the CPU (VNNI/AMX) and the model, not on the calibrated ranges, so random inputs serve
        (2 calibration batches; the model is timed, never judged). Done once per prepared model."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        feeds = synthetic_feeds(prepared.model_path)
        if feeds is None:
            return {"why": "input shapes beyond the batch are not fixed: not measured, static first"}
        os.makedirs(prepared.trials_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="probe_", dir=prepared.trials_dir)
        try:
            paths = {"static": os.path.join(scratch, "static.onnx"), "dynamic": os.path.join(scratch, "dynamic.onnx")}

            class _Feeds:
                def __init__(self):
                    self._it = iter([feeds, feeds])

                def get_next(self):
                    return next(self._it, None)

            quantize_static(prepared.model_path, paths["static"], _Feeds(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=cpu_has_vnni() is False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            self._dynamic(prepared, paths["dynamic"], TrialConfig.make({"per_channel": True,
                                                                         "approach": "dynamic"}), [])
            ms = time_sessions(paths, feeds, self.session_options())
            logger.info("onnxruntime: INT8 approach probe (batch-1 ms) %s", ms)
            return {"b1_ms": ms}
        except Exception as exc:  # noqa: BLE001 - a probe: without it static stays first
            logger.info("onnxruntime: INT8 approach probe failed: %s", exc)
            return {"why": f"probe failed: {type(exc).__name__}: {exc}"[:300]}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # ---- quantize ---------------------------------------------------------------------------

    def session_options(self):
        """The ``ort.SessionOptions`` every candidate uses (user's object when given)."""
        import onnxruntime as ort

        so = self.options.onnxruntime_session_options
        if so is not None and not isinstance(so, ort.SessionOptions):
            raise ValueError(
                f"onnxruntime_session_options: expected onnxruntime.SessionOptions, got {type(so).__name__}"
            )
        if so is None:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.thread_num is not None:
            if int(self.options.thread_num) < 1:
                raise ValueError(f"thread_num: expected a positive int, got {self.options.thread_num!r}")
            so.intra_op_num_threads = int(self.options.thread_num)
        return so

    @staticmethod
    def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
        return value

    @staticmethod
    def _check_knobs(precision: str, approach: str, config: TrialConfig) -> None:
        allowed = KNOBS["fp16" if precision == "fp16" else approach]
        if precision == "int8" and approach == "dynamic" and config.knob("approach") == "dynamic":
            # a transformer's static space also offers approach='dynamic': its static knobs ride along
            allowed = allowed | KNOBS["static"]
        unknown = sorted(k for k, _ in config.knobs if k not in allowed)
        if unknown:
            raise ValueError(
                f"config: knobs {unknown} don't apply to precision={precision!r}"
                + ("" if precision == "fp16" else f", approach={approach!r}")
                + f"; expected a subset of {sorted(allowed)}"
            )

    def _check_fallback(self, prepared: OrtPrepared, config: TrialConfig) -> list[str]:
        known = {n for n, _ in prepared.nodes}
        unknown = [n for n in config.fallback if n not in known]
        if unknown:
            raise ValueError(f"fallback: {unknown} are not nodes of the pre-processed ONNX graph")
        return list(config.fallback)

    def quantize(
        self,
        prepared: OrtPrepared,
        precision: str,
        config: TrialConfig,
        calibration: CalibrationData | None,
        accuracy: AccuracyContext | None = None,
    ) -> OrtCandidate:
        approach = self._trial_approach(precision, config, calibration)
        self.validate(precision, approach)
        self._check_knobs(precision, approach, config)
        fallback = self._check_fallback(prepared, config)
        if precision == "int8" and approach == "static" and calibration is None:
            raise ValueError("calibration: static INT8 needs calibration data, got None")
        os.makedirs(prepared.trials_dir, exist_ok=True)
        trial_dir = tempfile.mkdtemp(prefix="trial_", dir=prepared.trials_dir)
        out = os.path.join(trial_dir, MODEL_FILE)
        try:
            if precision == "fp16":
                self._fp16(prepared, out, fallback)
            elif approach == "dynamic":
                self._dynamic(prepared, out, config, fallback, calibration)
            else:
                self._static(prepared, out, config, fallback, calibration)
            candidate = OrtCandidate(
                out, prepared.input_names, prepared.output_names, precision, self.session_options(), config
            )
        except BaseException:
            shutil.rmtree(trial_dir, ignore_errors=True)
            raise
        candidate._own(trial_dir)
        return candidate

    def _trial_approach(self, precision: str, config: TrialConfig, calibration) -> str:
        """The config's ``approach`` knob (set by ``search_space``), else static iff calibrated."""
        if precision != "int8":
            return self.options.approach
        approach = config.knob("approach")
        if approach is None:
            approach = "static" if calibration is not None else "dynamic"
        return self._check_choice("approach", approach, self.precisions["int8"])

    def _static(self, prepared, out, config, fallback, calibration) -> None:
        """Static INT8 (QDQ or QOperator). ``FP32_OP_TYPES`` (Softmax) stay FP32 in every trial:
        see there."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        fmt = self._check_choice("format", config.knob("format", FORMATS[0]), FORMATS)
        if self.options.method == "qlinear" and fmt != "QOperator":
            raise ValueError(f"format: method='qlinear' pins 'QOperator', got {fmt!r}")
        act = self._check_choice("activation_type", config.knob("activation_type", "uint8"), ACTIVATION_TYPES)
        per_channel = bool(config.knob("per_channel", True))
        cal = self._check_choice(
            "calibrate_method", config.knob("calibrate_method", "MinMax"), CALIBRATE_METHODS
        )
        reduce_range = bool(config.knob("reduce_range", False))
        # Calibration is streamed in chunks through ORT's strided collection: every chunk's ranges /
        # histograms are merged, so RAM holds one chunk of activations (cut to a byte budget), not
        # the whole set. (CalibMaxIntermediateOutputs is not used: in ORT 1.23 it drops the cleared
        # chunks.)
        reader = _calibration_reader(calibration, prepared.input_names, uniform=cal != "MinMax",
                                     row_bytes=getattr(prepared, "activation_row_bytes", 0))
        if len(reader) == 0:
            raise ValueError("calibration: the calibration data yielded no batches")
        extra: dict[str, Any] = {"CalibStridedMinMax": reader.stride}
        model_in, keep_fp32 = prepared.model_path, []
        alpha = smooth_quant_alpha(config)
        if alpha is not None:  # see smooth.py for why not extra_options={"SmoothQuant": True}
            from nano_tfx.backends.onnxruntime.smooth import smooth_model

            model_in = os.path.join(os.path.dirname(out), "smoothed.onnx")
            keep_fp32 = smooth_model(prepared.model_path, model_in, calibration, prepared.input_names, alpha)
        quantize_static(
            model_in,
            out,
            reader,
            quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(fallback) + keep_fp32 + prepared.quantizable(FP32_OP_TYPES),
            calibrate_method=getattr(CalibrationMethod, cal),
            extra_options=extra,
        )
        if model_in != prepared.model_path:
            os.remove(model_in)

    def _dynamic(self, prepared, out, config, fallback, calibration=None) -> None:
        """IntegerOps. Conv → ConvInteger always gets uint8 weights: ORT's CPU ConvInteger kernel
        is U8U8 only, so with int8 weights the Conv nodes go through a second uint8 pass.
        ``smooth_quant`` smooths first, as in a static trial: an outlier channel widens the range a
        dynamic MatMul quantizes its activation with just as much (the encoder's default approach
        can be dynamic, and the strategy tries smoothing on top of it)."""
        src = self._dynamic_source(prepared)
        alpha = smooth_quant_alpha(config)
        if alpha is not None:
            if calibration is None:
                raise ValueError("smooth_quant: SmoothQuant needs calibration data (calib_dataset=), got none")
            from nano_tfx.backends.onnxruntime.smooth import smooth_model

            smoothed = os.path.join(os.path.dirname(out), "smoothed.onnx")
            fallback = list(fallback) + smooth_model(src, smoothed, calibration, prepared.input_names, alpha)
            try:
                self._dynamic_quantize(prepared, smoothed, out, config, fallback)
            finally:
                os.remove(smoothed)
            return
        self._dynamic_quantize(prepared, src, out, config, fallback)

    def _dynamic_quantize(self, prepared, src, out, config, fallback) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        wt = self._check_choice("weight_type", config.knob("weight_type", "int8"), WEIGHT_TYPES)
        with_conv = bool(config.knob("quantize_conv", False))
        common = dict(
            per_channel=bool(config.knob("per_channel", False)),
            reduce_range=bool(config.knob("reduce_range", False)),
            nodes_to_exclude=list(fallback),
        )
        if prepared.activation_matmuls:
            # attention's QK^T / AV products too (both sides DynamicQuantizeLinear), as static QDQ does:
            # the same speed, measured, and the encoder's MatMuls all run in INT8
            common["extra_options"] = {"MatMulConstBOnly": False}
        non_conv = [op for op in DYNAMIC_WEIGHTED_OPS if op != "Conv"]
        if wt == "uint8":
            ops = non_conv + (["Conv"] if with_conv else [])
            quantize_dynamic(src, out, op_types_to_quantize=ops,
                             weight_type=QuantType.QUInt8, **common)
            return
        if not with_conv:
            quantize_dynamic(src, out, op_types_to_quantize=non_conv,
                             weight_type=QuantType.QInt8, **common)
            return
        first = out + ".s8.onnx"
        try:
            quantize_dynamic(src, first, op_types_to_quantize=non_conv,
                             weight_type=QuantType.QInt8, **common)
            quantize_dynamic(first, out, op_types_to_quantize=["Conv"], weight_type=QuantType.QUInt8, **common)
        finally:
            if os.path.exists(first):
                os.remove(first)

    @staticmethod
    def _dynamic_source(prepared: OrtPrepared) -> str:
        """The model dynamic trials quantize: the prepared one, its weighted Gemms as MatMuls
        (``gemm_as_matmul``; written once, next to it)."""
        path = prepared.model_path[: -len(".onnx")] + "_gemm_as_matmul.onnx"
        if os.path.exists(path):
            return path
        if not any(op == "Gemm" for _, op in prepared.nodes):
            return prepared.model_path
        tmp = path + f".{os.getpid()}.tmp"
        if gemm_as_matmul(prepared.model_path, tmp):
            os.replace(tmp, path)
            return path
        return prepared.model_path

    def _fp16(self, prepared, out, fallback) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(prepared.model_path)
        model = convert_float_to_float16(model, keep_io_types=True, node_block_list=fallback or None)
        onnx.save(model, out)

    # ---- diagnose ---------------------------------------------------------------------------

    def diagnose(self, prepared: OrtPrepared, candidate: Candidate, batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
        from nano_tfx.backends.onnxruntime.diagnose import diagnose

        return diagnose(self, prepared, candidate, batches)

    # ---- load -------------------------------------------------------------------------------

    def fp32_candidate(self, prepared: OrtPrepared) -> OrtCandidate:
        """The pre-processed FP32 ONNX model every trial quantizes from, in a session with the
        trials' options: the same engine and settings, only the precision differs."""
        return OrtCandidate(prepared.model_path, prepared.input_names, prepared.output_names, "fp32",
                            self.session_options())

    def load(self, directory: str, manifest: Mapping[str, Any]) -> OrtCandidate:
        path = os.path.join(directory, MODEL_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"directory: {directory!r} has no {MODEL_FILE}")
        inputs = [TensorInfo.from_dict(t).name if isinstance(t, Mapping) else t.name for t in manifest["inputs"]]
        outputs = [TensorInfo.from_dict(t).name if isinstance(t, Mapping) else t.name for t in manifest["outputs"]]
        config = manifest.get("config")
        if isinstance(config, str):
            config = json.loads(config)
        cfg = TrialConfig.from_dict(config) if isinstance(config, Mapping) else None
        return OrtCandidate(
            path, inputs, outputs, manifest.get("precision", "int8"), self.session_options(), cfg
        )

    def bf16_fallback(self, config: TrialConfig | None = None) -> str | None:
        # ONNX Runtime 1.23's CPU execution provider registers no bfloat16 kernel for MatMul, Gemm
        # or Conv (BF16 there is CUDA/DNNL-EP only): a BF16 node would be a Cast-wrapped FP32 one.
        return "onnxruntime: the CPU execution provider has no BF16 MatMul/Gemm/Conv kernels"

    def describe(self) -> dict:
        import onnxruntime as ort

        return {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "method": self.options.method,
            "opset": self._opset(),
            "cpu_vnni": cpu_has_vnni(),
        }
