"""SmoothQuant for the ONNX Runtime backend: neural-compressor's ``ORTSmoothQuant`` (what
``quantize_static(extra_options={'SmoothQuant': True})`` calls), applied here before
``quantize_static``, with the smoothing folded into a decomposed LayerNorm.

Why not the extra option itself (measured, INC 3.7.1 + ORT 1.23, tf2onnx graphs): tf2onnx
decomposes Keras' LayerNormalization into Mul/Add nodes, so INC's folding (which knows the
``LayerNormalization`` op) finds nothing to fold into and the smoothing ``Mul`` stays; ORT's QDQ
quantizer then still quantizes every node of the decomposed LayerNorm per tensor — the tensors
with the outlier channels smoothing was meant to avoid — and the outlier encoder of
tests/test_smoothquant.py came out at 0.06 accuracy (plain INT8: 0.82).

Here each smoothing Mul (one per smoothed tensor) is folded into the per-channel constants of
the decomposed LayerNorm that produces its input (gamma and beta divided by the scale: the
LayerNorm's output is linear in them), checked by running the FP32 model before and after;
where that does not hold, the Mul stays and it and the nodes computing its input (up to the
LayerNorm's statistics) are kept in FP32, so no outlier tensor is quantized.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterable, Sequence

import numpy as np

_LOG = logging.getLogger("nano_tfx.backends.onnxruntime")

#: op types whose activation input is smoothed (SmoothQuant is about Linear layers; Conv inputs
#: have their outliers per spatial position, not per channel)
SMOOTHED_OPS = ["MatMul", "Gemm"]


#: ops of a decomposed LayerNorm between its per-channel constants and its output (+ the
#: Reshape a 3-D Dense puts in front of its MatMul, when it keeps the channel axis)
_AFFINE_OPS = {"Add", "Sub", "Mul", "Neg"}
_DEPTH = 4
#: fused LayerNorm ops -> index of their scale input (the bias follows it)
_FUSED_NORMS = {"LayerNormalization": 1, "SkipLayerNormalization": 2, "SimplifiedLayerNormalization": 1}


def smooth_model(model_path: str, out_path: str, batches: Iterable[Sequence[np.ndarray]],
                 input_names: Sequence[str], alpha: float) -> list[str]:
    """Write the smoothed FP32 model of ``model_path`` to ``out_path``; returns the names of the
    nodes that must stay in FP32 (none when every smoothing was folded)."""
    from neural_compressor.adaptor.ox_utils.smooth_quant import ORTSmoothQuant

    names = list(input_names)
    loader = [({n: np.asarray(a) for n, a in zip(names, batch)}, None) for batch in batches]
    if not loader:
        raise ValueError("calibration: SmoothQuant needs calibration data, got no batches")
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    sq = ORTSmoothQuant(model_path, loader, reduce_range=False)
    # One scale per tensor (ops reading the same tensor share one Mul: Q/K/V after a LayerNorm),
    # calibrated on every batch; INC's own folding is off (it only knows fused LayerNorm ops).
    with contextlib.redirect_stdout(io.StringIO()):  # INC prints a progress bar per weight
        model = sq.transform(alpha=float(alpha), folding=False, op_types=list(SMOOTHED_OPS),
                             scales_per_op=False, calib_iter=len(loader)).model
    probe = loader[0][0]
    reference = _run(model, probe)
    folded, fold_count = _fold(model)
    if fold_count and _close(reference, _run(folded, probe)):
        model = folded
    else:
        fold_count = 0
    keep = _keep_fp32(model)  # the smoothing Muls that could not be folded
    import onnx

    onnx.save(model, out_path)
    _LOG.info("onnxruntime: SmoothQuant alpha=%g: %d smoothing(s) folded into LayerNorms, %d node(s) kept in FP32",
              alpha, fold_count, len(keep))
    return keep


def _run(model, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(x, y, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(x).max(initial=0.0))))
               for x, y in zip(a, b))


def _smooth_muls(model) -> list:
    return [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth_mul")]


def _fold(model):
    """A copy of ``model`` with each smoothing Mul that can be folded into the per-channel
    constants of the (decomposed or fused ``LayerNormalization``) LayerNorm computing its input folded (not: no such constants, or
    the input or the constants have other readers); and how many were folded."""
    import copy

    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        if n.op_type == "Shape":  # reads the shape only, which folding leaves alone
            continue
        for i in n.input:
            readers.setdefault(i, []).append(n)
    last_dim = _last_dims(model)
    normalized = _normalized_inputs(model)

    def passes(node) -> bool:
        if node.op_type in _AFFINE_OPS or node.op_type in _FUSED_NORMS:
            return True
        return node.op_type == "Reshape" and last_dim.get(node.input[0]) == last_dim.get(node.output[0]) is not None

    folded = 0
    for mul in _smooth_muls(model):
        tensor, scale_name = mul.input[0], mul.input[1]
        if len(readers.get(tensor, [])) != 1 or scale_name not in inits or tensor not in producer:
            continue
        if any(out.name == mul.output[0] for out in graph.output):
            continue
        factor = numpy_helper.to_array(inits[scale_name]).reshape(-1)
        found, gamma, exclusive = [], False, True  # a LayerNorm's output: a per-channel Mul (gamma)
        frontier, seen = [(producer[tensor], tensor)], set()
        for _ in range(_DEPTH):
            nxt = []
            for node, via in frontier:
                if node.name in seen or not passes(node):
                    continue
                if node.op_type == "Reshape" and len(readers.get(node.input[0], [])) != 1:
                    exclusive = False  # the LayerNorm also feeds another smoothed tensor
                seen.add(node.name)
                if node.op_type in _FUSED_NORMS:
                    # a fused LayerNorm (the ONNX Runtime backend rewrites Keras 3's decomposed one
                    # for the transformer fusions, which may fuse it with the residual Add): its
                    # scale and bias are the per-channel constants of its normalized output only
                    if via != node.output[0]:
                        exclusive = False
                        continue
                    first = _FUSED_NORMS[node.op_type]
                    consts = [i for i in node.input[first:first + 2] if i in inits
                              and numpy_helper.to_array(inits[i]).shape[-1:] == factor.shape]
                    found += consts
                    gamma = gamma or bool(consts)
                    continue
                for i in node.input[:1] if node.op_type == "Reshape" else node.input:
                    if i in inits and numpy_helper.to_array(inits[i]).shape[-1:] == factor.shape:
                        found.append(i)
                        gamma = gamma or node.op_type == "Mul"
                    elif i in producer and i not in normalized:
                        nxt.append((producer[i], i))
            frontier = nxt
        if not gamma or not exclusive or any(len(readers.get(i, [])) != 1 for i in found):
            continue
        for name in dict.fromkeys(found):
            value = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), name))
        for reader in readers.get(mul.output[0], []):
            for k, i in enumerate(reader.input):
                if i == mul.output[0]:
                    reader.input[k] = tensor
        graph.node.remove(mul)
        folded += 1
    return model, folded


def _normalized_inputs(model) -> set[str]:
    """Tensors a normalization takes statistics of (a LayerNorm's input): the walk from its
    output back to its gamma/beta stops there, or it would fold into the layer before it."""
    stats = ("ReduceMean", "GlobalAveragePool", "BatchNormalization", "MeanVarianceNormalization",
             "LayerNormalization")
    return {i for n in model.graph.node if n.op_type in stats for i in n.input[:1]}


def _last_dims(model) -> dict[str, int]:
    """Static last dimension of every tensor with a known shape (the pre-processed model carries
    symbolic shape inference's value_info)."""
    out = {}
    g = model.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[vi.name] = int(dims[-1].dim_value)
    return out


def _keep_fp32(model) -> list[str]:
    """The smoothing Muls and the nodes computing their inputs, back to ``_DEPTH`` affine ops."""
    producer = {o: n for n in model.graph.node for o in n.output}
    normalized = _normalized_inputs(model)
    keep = []
    for mul in _smooth_muls(model):
        keep.append(mul.name)
        frontier = [producer[mul.input[0]]] if mul.input[0] in producer else []
        for _ in range(_DEPTH):
            nxt = []
            for node in frontier:
                if node.op_type in _AFFINE_OPS or node.op_type == "Reshape":
                    keep.append(node.name)
                    ins = node.input[:1] if node.op_type == "Reshape" else node.input
                    nxt += [producer[i] for i in ins if i in producer and i not in normalized]
            frontier = nxt
    return list(dict.fromkeys(keep))
