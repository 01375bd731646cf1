"""``accelerator=None``: Intel Neural Compressor's post-training quantization on the TF graph.

INC 3.7.1 ships its 2.x API (``quantization.fit`` + ``PostTrainingQuantConfig``), which takes a
SavedModel *path*. We call it once per trial with ``quant_level=1`` and no ``eval_func``, so INC
does exactly the config we ask for (knobs via ``op_type_dict``, FP32 fallback via
``op_name_dict``) and our tuner owns the search — the same search for every backend.
The INT8 kernels need oneDNN (see ``nano_tfx._env``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from nano_tfx.backends.base import (
    FALLBACK_PRECISION, INT8_BF16, SMOOTH_QUANT, AccuracyContext, Backend, CalibrationData, Candidate, SearchSpace,
    TrialConfig, register, smooth_quant_alpha,
)
from nano_tfx.backends.inc.convert import (
    _COMPUTE_OPS, _frozen_graph, _tensor_names, hidden_compute_ops, inc_node_names, loop_compute_nodes,
    save_graph_def,
)
from nano_tfx.backends.inc.quantize import _capture_calibration_on_fd2, _Loader, contained_temp_files
from nano_tfx.backends.inc.rewrite import rewrite_saved_model
from nano_tfx.interchange import SavedModelSource, TensorInfo, export_signature_as_default

#: SmoothQuant alphas (``smooth_quant`` knob), in the default strategy's order: 0.5 is INC's default
#: (1.0 accuracy at 0.5 and 0.75 on tests/outlier_encoder.py, plain INT8 0.84)
SMOOTH_QUANT_ALPHAS = (0.5, 0.75)


@dataclass
class _Prepared:
    source: SavedModelSource
    workdir: str
    compute_nodes: list[str]
    input_nodes: list[str]  # frozen-graph placeholder names, in source.inputs order
    model_path: str  # what INC's fit() loads: a SavedModel whose serving_default is the signature
    #: INC's name of each compute node (``compute_nodes``) -> its name in the frozen FP32 graph
    fp32_nodes: dict[str, str] = field(default_factory=dict)
    #: the frozen FP32 graph ``prepare`` built, with its input and output node names (the
    #: engine's FP32 model: ``fp32_candidate``, diagnosis), kept so nothing is frozen twice
    fp32_graph: tuple | None = field(default=None, repr=False, compare=False)
    has_matmul: bool = False  # a MatMul INC quantizes: SmoothQuant has something to smooth
    #: compute nodes inside while loops (LSTM/GRU cells): always FP32 (``loop_compute_nodes``)
    loop_nodes: list[str] = field(default_factory=list)


class IncCandidate(Candidate):
    """An INT8 TF graph run by a TF session (oneDNN kernels); saved as a TF2 SavedModel with a
    ``serving_default`` signature, so TF Serving and ``nano_tfx.load`` read the same files."""

    backend = "inc"

    def __init__(self, graph_def, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                 input_tensors: Sequence[str], output_tensors: Sequence[str], precision: str = "int8",
                 thread_num: int | None = None):
        import tensorflow as tf

        self.graph_def = graph_def
        self.inputs, self.outputs, self.precision = tuple(inputs), tuple(outputs), precision
        self.input_tensors, self.output_tensors = list(input_tensors), list(output_tensors)
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        config = tf.compat.v1.ConfigProto()
        if thread_num:
            config.intra_op_parallelism_threads = thread_num
            config.inter_op_parallelism_threads = 1
        self._sess = tf.compat.v1.Session(graph=graph, config=config)
        self._feeds = [graph.get_tensor_by_name(n) for n in self.input_tensors]
        self._fetches = [graph.get_tensor_by_name(n) for n in self.output_tensors]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self._fetches, dict(zip(self._feeds, inputs)))

    def save(self, directory: str) -> None:
        import tensorflow as tf

        save_graph_def(self.graph_def, self.input_tensors, self.output_tensors, self.inputs,
                       [t.name for t in self.outputs], directory)
        tf.io.write_graph(self.graph_def, directory, "int8_graph.pb", as_text=False)

    def size_bytes(self, directory: str | None = None) -> int | None:
        return self.graph_def.ByteSize()

    def manifest_info(self) -> dict:
        return {"input_tensors": self.input_tensors, "output_tensors": self.output_tensors}

    def int8_ops(self) -> dict[str, list[int]] | None:
        from nano_tfx.backends.inc.coverage import count

        return count(self.graph_def)


class _Precisions:
    """INT8 always; BF16 (INC's mixed precision) where the CPU has native BF16 (``nano_tfx.cpu``)."""

    def __get__(self, obj, objtype=None) -> Mapping[str, tuple[str, ...]]:
        from nano_tfx.cpu import bf16_support

        return MappingProxyType({"int8": ("static",), **({"bf16": ()} if bf16_support()[0] else {})})


@register(None)
class IncBackend(Backend):
    name = "inc"
    precisions = _Precisions()

    def validate(self, precision: str, approach: str) -> None:
        if precision == "int8" and approach != "static":
            raise ValueError(
                f"approach: accelerator=None (INC on the TF graph) supports 'static' only, got {approach!r}; "
                "dynamic quantization is available with accelerator='onnxruntime'"
            )
        super().validate(precision, approach)
        from nano_tfx._env import onednn_enabled

        if not onednn_enabled():
            raise RuntimeError(
                "accelerator=None: INC's INT8 TensorFlow kernels need oneDNN, which TensorFlow reads once "
                "at import. Set TF_ENABLE_ONEDNN_OPTS=1 before importing tensorflow (or import nano_tfx first)."
            )

    def prepare(self, source: SavedModelSource, workdir: str) -> _Prepared:
        # Keras attention/EinsumDense and 3-D Dense (Einsum, BatchMatMulV2 on a constant kernel):
        # rewritten into the 2-D MatMuls INC's TF kernels quantize; None when there is nothing to do
        source = rewrite_saved_model(source, os.path.join(workdir, "inc_rewritten"))[0] or source
        graph_def, input_nodes, output_nodes = _frozen_graph(source)
        hidden = hidden_compute_ops(graph_def)
        if hidden:
            logging.getLogger("nano_tfx").warning(
                "nano-tfx: inc: %d compute op(s) of %r stay inside a function call TF's freezing does not "
                "inline (a pruned/wrapped function?): INC leaves them in FP32", hidden, source.path)
        compute = [n.name for n in graph_def.node if n.op in _COMPUTE_OPS]
        inc_names = inc_node_names(graph_def, compute)  # the names op_name_dict fallback accepts
        in_loops = set(loop_compute_nodes(graph_def, compute))
        frozen = [n for n in compute if n not in in_loops]
        nodes = [inc_names[n] for n in frozen]
        # First and last compute layers are the usual accuracy suspects: offer them first.
        ordered = nodes[:1] + nodes[-1:] + nodes[1:-1] if len(nodes) > 2 else nodes
        model_path = source.path
        if source.signature_key != "serving_default":  # INC's fit(path) always takes serving_default
            model_path = export_signature_as_default(source.path, source.signature_key,
                                                     os.path.join(workdir, "inc_input_model"))
        return _Prepared(source, workdir, list(dict.fromkeys(ordered)), input_nodes, model_path,
                         {v: k for k, v in inc_names.items()}, (graph_def, input_nodes, output_nodes),
                         any(n.op == "MatMul" for n in graph_def.node),
                         [inc_names[n] for n in compute if n in in_loops])

    def fp32_candidate(self, prepared: _Prepared) -> IncCandidate:
        """The frozen FP32 graph run by a TF session like the INT8 candidates (same threads,
        same oneDNN kernels): the engine INC's INT8 replaces, only the precision differs."""
        from nano_tfx.backends.inc.convert import _frozen_graph

        if prepared.fp32_graph is None:  # a _Prepared from before the graph was kept
            prepared.fp32_graph = _frozen_graph(prepared.source)
        graph_def, input_nodes, output_nodes = prepared.fp32_graph
        source = prepared.source
        return IncCandidate(graph_def, source.inputs, source.outputs, [f"{n}:0" for n in input_nodes],
                            [f"{n}:0" for n in output_nodes], "fp32", self.options.thread_num)

    def search_space(self, prepared: _Prepared, precision: str, approach: str) -> SearchSpace:
        if precision != "int8":  # BF16: nothing to tune
            return SearchSpace()
        knobs: dict[str, list] = {
            "activation_algorithm": ["minmax", "kl"],
            "weight_granularity": ["per_channel", "per_tensor"],
        }
        smoothing: tuple = ()
        if getattr(prepared, "has_matmul", False):
            # INC's smooth_quant recipe (0.5: its default); tried first on outlier channels
            knobs[SMOOTH_QUANT] = [None, *SMOOTH_QUANT_ALPHAS]
            smoothing = tuple({SMOOTH_QUANT: a} for a in SMOOTH_QUANT_ALPHAS)
        return SearchSpace(knobs=knobs, fallback_candidates=prepared.compute_nodes, smoothing=smoothing)

    def quantize(self, prepared: _Prepared, precision: str, config: TrialConfig,
                 calibration: CalibrationData | None, accuracy: AccuracyContext | None = None) -> IncCandidate:
        from neural_compressor.config import PostTrainingQuantConfig, options
        from neural_compressor.quantization import fit

        source = prepared.source
        options.workspace = os.path.join(prepared.workdir, "nc_workspace")
        if precision == "bf16":
            return self._bf16(prepared)
        if calibration is None:
            raise ValueError("calib_dataset: INC static quantization needs calibration data")
        loader = _Loader(calibration, prepared.input_nodes)
        op_type = {
            op: {
                "weight": {"granularity": [config.knob("weight_granularity", "per_channel")]},
                "activation": {"algorithm": [config.knob("activation_algorithm", "minmax")]},
            }
            for op in ("Conv2D", "DepthwiseConv2dNative", "MatMul")
        }
        # INT8+BF16: INC's mixed precision converts the fallback ops to BF16 (Cast pairs around
        # them, oneDNN BF16 kernels) instead of leaving them in FP32.
        kept = config.knob(FALLBACK_PRECISION, "fp32")
        if kept not in ("fp32", "bf16"):
            raise ValueError(f"{FALLBACK_PRECISION}: expected 'fp32' or 'bf16', got {kept!r}")
        op_name = {n: {"activation": {"dtype": [kept]}, "weight": {"dtype": [kept]}} for n in config.fallback}
        alpha = smooth_quant_alpha(config)
        # INC's TF smooth_quant recipe: per input channel of every MatMul, a Mul (activation / s)
        # before it and the kernel rows times s, s = max|x|^alpha / max|w|^(1 - alpha)
        recipes = {"smooth_quant": True, "smooth_quant_args": {"alpha": alpha}} if alpha is not None else {}
        fp32 = {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}}
        op_name.update({n: fp32 for n in getattr(prepared, "loop_nodes", ()) if n not in op_name})
        conf = PostTrainingQuantConfig(
            quant_level=1,
            recipes=recipes,
            calibration_sampling_size=[loader.samples],
            op_type_dict=op_type,
            op_name_dict=op_name or None,
            reduce_range=False,
        )
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
        _capture_calibration_on_fd2()
        # The SavedModel path, not our frozen GraphDef: INC's GraphDef route mis-fuses biases on
        # some graphs ("Cannot convert ... to a TensorFlow DType" in rerange_quantized_concat).
        with contained_temp_files(os.path.join(prepared.workdir, f"inc_tmp_{os.getpid()}")):
            q = fit(model=prepared.model_path, conf=conf, calib_dataloader=loader)
        if q is None:
            raise RuntimeError("INC returned no model for this config")
        return IncCandidate(
            q.graph_def, source.inputs, source.outputs,
            _tensor_names(q.input_tensor_names, sorted(source.input_names), source.input_names),
            _tensor_names(q.output_tensor_names, sorted(source.output_names), source.output_names),
            INT8_BF16 if kept == "bf16" and config.fallback else precision, self.options.thread_num,
        )

    def _bf16(self, prepared: _Prepared) -> IncCandidate:
        """INC's mixed precision: MatMul/Conv and friends converted to BF16 (Cast pairs, oneDNN
        BF16 kernels), the rest FP32; no calibration."""
        from neural_compressor import mix_precision
        from neural_compressor.config import MixedPrecisionConfig

        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
        with contained_temp_files(os.path.join(prepared.workdir, f"inc_tmp_{os.getpid()}")):
            q = mix_precision.fit(prepared.model_path, MixedPrecisionConfig())
        if q is None:
            raise RuntimeError("INC's mixed precision returned no model")
        source = prepared.source
        return IncCandidate(
            q.graph_def, source.inputs, source.outputs,
            _tensor_names(q.input_tensor_names, sorted(source.input_names), source.input_names),
            _tensor_names(q.output_tensor_names, sorted(source.output_names), source.output_names),
            "bf16", self.options.thread_num,
        )

    def bf16_fallback(self, config: TrialConfig | None = None) -> str | None:
        from neural_compressor.utils.utility import CpuInfo

        # INC converts to BF16 only where it sees native BF16 (or FORCE_BF16=1, its own override)
        if not (CpuInfo().bf16 or os.getenv("FORCE_BF16") == "1"):
            return "inc: Intel Neural Compressor sees no BF16 on this CPU (CpuInfo().bf16 is False)"
        if config is not None and not config.fallback:  # INC's BF16 applies to fallback ops only
            return "inc: INT8 kept no layer in FP32, nothing to run in BF16"
        return None

    def diagnose(self, prepared: _Prepared, candidate: Candidate,
                 batches: Sequence[Sequence[np.ndarray]]) -> list[dict]:
        from nano_tfx.backends.inc.diagnose import diagnose

        return diagnose(self, prepared, candidate, batches)

    def load(self, directory: str, manifest: Mapping[str, Any]) -> IncCandidate:
        import tensorflow as tf

        graph_def = tf.compat.v1.GraphDef()
        with open(os.path.join(directory, "int8_graph.pb"), "rb") as f:
            graph_def.ParseFromString(f.read())
        extra = manifest.get("backend_info") or {}
        inputs = [TensorInfo.from_dict(t) for t in manifest["inputs"]]
        outputs = [TensorInfo.from_dict(t) for t in manifest["outputs"]]
        return IncCandidate(
            graph_def, inputs, outputs,
            extra.get("input_tensors") or [f"{t.name}:0" for t in inputs],
            extra["output_tensors"], manifest.get("precision", "int8"), self.options.thread_num,
        )

