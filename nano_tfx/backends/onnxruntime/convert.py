"""SavedModel -> ONNX (tf2onnx) -> ``quant_pre_process``; the prepared state every trial shares."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from nano_tfx.backends.onnxruntime.space import STATIC_WEIGHTED_OPS
from nano_tfx.interchange import SavedModelSource

logger = logging.getLogger("nano_tfx.backends.onnxruntime")

# --------------------------------------------------------------------------------------------
# Prepared state
# --------------------------------------------------------------------------------------------


@dataclass
class OrtPrepared:
    """Everything a trial needs; plain data, safe to pickle."""

    source: SavedModelSource
    workdir: str  # <workdir>/onnxruntime, owned by this backend
    fp32_path: str  # tf2onnx output
    model_path: str  # pre-processed model every trial starts from
    preprocessed: str  # "full" | "full_auto_merge" | "no_symbolic_shape" | "none" (quant_pre_process)
    opset: int
    input_names: list[str]
    output_names: list[str]
    #: (node name, op type) of every node in graph order, pre-processed model
    nodes: list[tuple[str, str]] = field(default_factory=list)
    #: node name → weight-range spread (max over channels / median over channels of |w|max)
    weight_spread: dict[str, float] = field(default_factory=dict)
    #: bytes of the float activations of one input row (value_info of the pre-processed model;
    #: 0 unknown): the calibration reader's chunk size (``quantize._calibration_reader``)
    activation_row_bytes: int = 0

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.workdir, "trials")

    def quantizable(self, op_types: Iterable[str]) -> list[str]:
        ops = set(op_types)
        return [name for name, op in self.nodes if op in ops and name]

# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------


def activation_row_bytes(model) -> int:
    """Bytes of every float tensor the graph computes for one row (batch dimension excluded),
    from the shapes shape inference left in ``value_info`` (dynamic non-batch dims count as 1:
    a lower bound for sequence models). What a calibrator collects is at most this."""
    import onnx

    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
             onnx.TensorProto.BFLOAT16: 2}
    total = 0
    for vi in list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.elem_type not in sizes or not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim[1:]]
        total += int(np.prod(dims, dtype=np.int64)) * sizes[t.elem_type]
    return total
# --------------------------------------------------------------------------------------------


def _weight_spread(model) -> dict[str, float]:
    """Per weighted node: max(|w| per output channel) / median(...). Large = per-tensor-hostile."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    spread: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in STATIC_WEIGHTED_OPS or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None:
            continue
        try:
            w = numpy_helper.to_array(init).astype(np.float32)
        except Exception:  # pragma: no cover - exotic initializers
            continue
        if w.ndim < 2:
            continue
        if node.op_type in ("Conv",):
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:  # MatMul: [K, N]
            axis = w.ndim - 1
        per_ch = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
        med = float(np.median(per_ch))
        spread[node.name] = float(per_ch.max() / med) if med > 0 else float("inf")
    return spread


def _convert_to_onnx(source: SavedModelSource, output_path: str, opset: int) -> None:
    """tf2onnx from the SavedModel signature; names follow the signature's structured names."""
    import tensorflow as tf
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    graph_def, inputs, outputs, tables, renames = tf_loader.from_saved_model(
        source.path,
        None,
        None,
        tag=["serve"],
        signatures=[source.signature_key],
        return_initialized_tables=True,
        return_tensors_to_rename=True,
    )
    with tf.device("/cpu:0"):
        _convert_common(
            graph_def,
            name=source.path,
            opset=opset,
            input_names=inputs,
            output_names=outputs,
            tensors_to_rename=renames,
            initialized_tables=tables,
            output_path=output_path,
        )


def _preprocess(src: str, dst: str) -> str:
    """``quant_pre_process`` with graceful degradation; returns how far it got."""
    from onnxruntime.quantization import quant_pre_process

    attempts = (
        ("full", {}),
        # e.g. two inputs whose free batch dims got different symbols, joined by a Concat
        ("full_auto_merge", {"auto_merge": True}),
        ("no_symbolic_shape", {"skip_symbolic_shape": True}),
    )
    # A failed symbolic inference dumps its partial model (and uuid-named external-data files)
    # into the *current directory*: run it from a scratch directory of our own.
    scratch = tempfile.mkdtemp(prefix="ort_preprocess_", dir=os.path.dirname(os.path.abspath(dst)))
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    cwd = os.getcwd()
    try:
        os.chdir(scratch)
        for label, kwargs in attempts:
            try:
                quant_pre_process(src, dst, **kwargs)
                if os.path.exists(dst):
                    return label
            except Exception as exc:  # symbolic shape inference / optimiser can fail on odd graphs
                logger.info("quant_pre_process (%s) failed: %s", label, exc)
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)
    logger.warning("quant_pre_process failed (see info log); quantizing the un-preprocessed model")
    shutil.copyfile(src, dst)
    return "none"
