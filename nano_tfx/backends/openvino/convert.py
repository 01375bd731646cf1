"""FP32 IR preparation: IO in source order/names, stable op names, model traits."""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from typing import Sequence

from nano_tfx.interchange import SavedModelSource

_LOG = logging.getLogger("nano_tfx.backends.openvino")

# Ops NNCF quantizes through their weights: the useful granularity for FP32 fallback.
_WEIGHTED_TYPES = (
    "Convolution",
    "GroupConvolution",
    "ConvolutionBackpropData",
    "GroupConvolutionBackpropData",
    "MatMul",
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _port_indices(ports, names: Sequence[str], what: str) -> list[int]:
    """Index of the port carrying each name (exact tensor name, then ``name:0``)."""
    found = []
    for name in names:
        hits = [i for i, p in enumerate(ports) if name in p.get_names() or f"{name}:0" in p.get_names()]
        if len(hits) != 1:
            raise ValueError(
                f"{what}: no unique OpenVINO tensor named {name!r}; model has "
                f"{[sorted(p.get_names()) for p in ports]}"
            )
        found.append(hits[0])
    return found


def _rebuild_io(model, source: SavedModelSource):
    """Same graph, parameters/results in ``source`` order carrying exactly the source names."""
    import openvino as ov
    import openvino.runtime.opset13 as opset13

    model_names = set().union(*(p.get_names() for p in model.inputs)) if model.inputs else set()
    unused = [t for t in source.inputs if t.name not in model_names and f"{t.name}:0" not in model_names]
    kept = [n for n in source.input_names if n not in {t.name for t in unused}]
    in_idx = dict(zip(kept, _port_indices(model.inputs, kept, "inputs")))
    out_idx = _port_indices(model.outputs, source.output_names, "outputs")
    if unused:
        # A signature input the graph never reads (a Keras Input wired to no layer) is pruned by
        # the converters; keep it as a dangling parameter so the model's inputs stay the source's.
        _LOG.info("openvino: inputs %s are unused by the graph; kept as unconnected parameters",
                  [t.name for t in unused])
    extra = {t.name: opset13.parameter(ov.PartialShape([ov.Dimension() if d is None else d for d in t.shape]),
                                          ov.Type(np.dtype(t.dtype)), name=t.name) for t in unused}
    params = [model.get_parameters()[in_idx[n]] if n in in_idx else extra[n] for n in source.input_names]
    results = [model.get_results()[i] for i in out_idx]
    if len(params) - len(extra) != len(model.get_parameters()):
        raise ValueError(
            f"inputs: signature {source.signature_key!r} converted to {len(model.get_parameters())} "
            f"inputs but the source lists {source.input_names}"
        )
    for p, name in zip(params, source.input_names):
        p.set_friendly_name(name)
        p.output(0).get_tensor().set_names({name})
    for r, name in zip(results, source.output_names):
        r.input_value(0).get_tensor().set_names({name})
    new = ov.Model(results, params, model.get_friendly_name() or "model")
    # Batch dim free: the engine calibrates/evaluates with any batch size.
    shapes = {}
    for p, info in zip(new.get_parameters(), source.inputs):
        ps = p.get_partial_shape()
        if ps.rank.is_static and len(ps) >= 1 and ps[0].is_static and (not info.shape or info.shape[0] is None):
            dims = [ov.Dimension()] + [ps[i] for i in range(1, len(ps))]
            shapes[p.output(0)] = ov.PartialShape(dims)
    if shapes:
        try:
            new.reshape(shapes)
        except Exception as exc:  # hard-coded batch inside the graph: keep it static
            _LOG.warning("openvino: could not make the batch dim dynamic (%s); keeping static shapes", exc)
    return new


_AUTO_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*_\d+$")  # OpenVINO's '<OpType>_<instance id>'


def _stable_names(model) -> None:
    """Rename weighted ops whose name is OpenVINO's auto '<OpType>_<instance id>' (a process-
    global counter: 'Convolution_28' here is 'Convolution_1193' in the next process, which would
    break fallback names across prepare/resume). The TF frontend loses most original names
    (transpose sinking, BN folding), so: '<scope>/<OpType>' when the op's only consumer is its
    named bias Add (the scope is then the Keras layer), else '<OpType>.<k>', k = the op's rank
    among ops of that type in topological order. Deterministic for a given SavedModel."""
    counters: dict[str, int] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in _WEIGHTED_TYPES:
            continue
        k = counters.get(kind, 0)
        counters[kind] = k + 1
        if not _AUTO_NAME.match(op.get_friendly_name()):
            continue
        consumers = [t.get_node() for o in op.outputs() for t in o.get_target_inputs()]
        name = f"{kind}.{k}"
        if len(consumers) == 1 and consumers[0].get_type_name() == "Add":
            anchor = consumers[0].get_friendly_name()
            if "/" in anchor and not _AUTO_NAME.match(anchor):
                name = f"{anchor.rsplit('/', 1)[0]}/{kind}.{k}"
        op.set_friendly_name(name)


def _has_attention(model) -> bool:
    """Softmax feeding a MatMul with two activation inputs: worth NNCF's transformer patterns."""
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Softmax":
            continue
        frontier, depth = [op], 0
        while frontier and depth < 4:
            nxt = []
            for n in frontier:
                for o in n.outputs():
                    for t in o.get_target_inputs():
                        c = t.get_node()
                        if c.get_type_name() == "MatMul" and all(
                            v.get_node().get_type_name() != "Constant" for v in c.input_values()
                        ):
                            return True
                        nxt.append(c)
            frontier, depth = nxt, depth + 1
    return False


# --------------------------------------------------------------------------------------------
# ONNX route
# --------------------------------------------------------------------------------------------
_NO_TRANSLATOR = re.compile(r"no translator found for operation\(s\):\s*([^\n]+)")


def unsupported_tf_ops(exc: Exception) -> list[str]:
    """The TF ops OpenVINO's TensorFlow frontend named as unconvertible ([] for other errors)."""
    match = _NO_TRANSLATOR.search(str(exc))
    return [op.strip() for op in match.group(1).split(",") if op.strip()] if match else []


def convert_via_onnx(source: SavedModelSource, workdir: str):
    """SavedModel signature -> ONNX (tf2onnx, as the ONNX Runtime backend does) -> OpenVINO.

    For graphs the TF frontend has no translator for but tf2onnx rewrites into standard ONNX ops
    (e.g. ``DenseBincount`` from Keras' ``CategoryEncoding``, which OpenVINO 2024.6 lacks)."""
    import openvino as ov
    import openvino.runtime.opset13 as opset13

    from nano_tfx.backends.onnxruntime.convert import _convert_to_onnx
    from nano_tfx.backends.onnxruntime.space import DEFAULT_OPSET

    os.makedirs(workdir, exist_ok=True)
    onnx_path = os.path.join(workdir, "fp32_tf2onnx.onnx")
    _convert_to_onnx(source, onnx_path, DEFAULT_OPSET)
    return ov.convert_model(onnx_path)
