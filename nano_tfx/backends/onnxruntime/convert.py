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
    #: MatMuls of two activations (attention's QK^T and AV): > 0 marks a transformer encoder,
    #: whose static search space also offers dynamic INT8 (see ``OnnxRuntimeBackend.search_space``)
    activation_matmuls: int = 0
    #: what ``onnxruntime.transformers`` fusion did in ``prepare`` (see ``_fuse_transformer``)
    fusion: dict = field(default_factory=dict)
    #: static vs dynamic INT8 batch-1 ms on this CPU, measured once (``space.probe_approaches``)
    approach_probe: dict | None = None
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


# --------------------------------------------------------------------------------------------
# Transformer graphs
# --------------------------------------------------------------------------------------------

#: FP32 agreement a fused graph must keep with the unfused one (max abs output difference)
FUSION_ATOL = 1e-4
#: within this of the unfused graph's batch-1 time the fused one counts as not slower (fewer nodes,
#: and the rounds of a short timing differ by about this much on an idle CPU)
FUSION_TIE = 0.02


def _activation_matmuls(model) -> int:
    """MatMuls whose both inputs are computed (no weight): attention's score and context products."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(1 for n in model.graph.node
               if n.op_type == "MatMul" and len(n.input) >= 2 and not {n.input[0], n.input[1]} & consts)


def synthetic_feeds(model_path: str, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Batch-1 inputs for the graph's input signature: normal floats, zero integers (valid token
    ids and masks). None when a dimension other than the first is not fixed (no shape to time)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in consts:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = np.ones(dims, dtype)
        else:
            feeds[inp.name] = np.zeros(dims, dtype)
    return feeds


def time_sessions(paths: dict[str, str], feeds: dict[str, np.ndarray], session_options,
                  rounds: int = 3, budget_s: float = 0.3) -> dict[str, float]:
    """Batch-1 ms of each ONNX file, interleaved over ``rounds`` (a noisy neighbour hits all alike);
    the median over rounds."""
    import onnxruntime as ort

    from nano_tfx.timing import latency_ms

    runs = {}
    for label, path in paths.items():
        sess = ort.InferenceSession(path, sess_options=session_options, providers=["CPUExecutionProvider"])
        runs[label] = (lambda _x, _s=sess: _s.run(None, feeds))
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            times[label].append(latency_ms(run, [], 2, 200, budget_s))
    return {label: float(np.median(ts)) for label, ts in times.items()}


def _fuse_transformer(src: str, dst: str, session_options) -> dict:
    """``onnxruntime.transformers.optimizer`` (model_type 'bert': Attention, SkipLayerNormalization,
    LayerNormalization, BiasGelu/FastGelu/Gelu fusions) on ``src``; the fused graph is written to
    ``dst`` only when something fused, it keeps the FP32 outputs (``FUSION_ATOL``) and it is not
    slower at batch 1. Returns what happened (``OrtPrepared.fusion``).

    tf2onnx's lowering of Keras MultiHeadAttention (Einsum → MatMul + Shape/Gather/Reshape chains)
    and of LayerNormalization (GlobalAveragePool moments, Reciprocal(Sqrt)) is not the PyTorch
    export the fusion patterns match, so on Keras encoders this usually reports no fusion.
    """
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    info: dict = {"applied": False}
    try:
        # opt_level 0: the graph patterns only; ORT's own level-2 optimizer runs in every session
        import onnx

        model = onnx.load(src)
        keras_ln = keras_layernorm_to_onnx(model)
        fused = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        stats = {k: int(v) for k, v in (fused.get_fused_operator_statistics() or {}).items() if v}
        if keras_ln:
            stats["LayerNormalization (from Keras 3 moments)"] = keras_ln
    except Exception as exc:  # noqa: BLE001 - an optional optimisation: never fail prepare
        info["why"] = f"onnxruntime.transformers optimizer failed: {type(exc).__name__}: {exc}"[:300]
        return info
    info["fused"] = stats
    if not stats:
        info["why"] = "no transformer fusion pattern matched the converted graph"
        return info
    scratch = dst + ".fused.onnx"
    try:
        fused.save_model_to_file(scratch)
        feeds = synthetic_feeds(src)
        if feeds is None:
            info["why"] = "input shapes not fixed: fusion not verified, not used"
            return info
        outs = []
        for path in (src, scratch):
            sess = ort.InferenceSession(path, sess_options=session_options, providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, feeds))
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
                   for a, b in zip(*outs))
        info["max_abs_diff"] = diff
        if not diff <= FUSION_ATOL:
            info["why"] = f"fused outputs differ by {diff:.3g} > {FUSION_ATOL:g}: not used"
            return info
        ms = time_sessions({"unfused": src, "fused": scratch}, feeds, session_options)
        info["b1_ms"] = ms
        if ms["fused"] > ms["unfused"] * (1 + FUSION_TIE):
            info["why"] = "the fused graph was not faster at batch 1: not used"
            return info
        os.replace(scratch, dst)
        info["applied"] = True
        return info
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


def gemm_as_matmul(src: str, dst: str) -> int:
    """Write ``src`` with every weighted Gemm (constant B, alpha 1, beta 1 or no bias, no transA) as
    MatMul (+ Add of the bias) to ``dst``; returns how many were rewritten. ORT's dynamic
    quantization has no Gemm (IntegerOps: MatMul/Conv/...): tf_keras' Dense on 2-D inputs and
    ``quant_pre_process``' MatMul+Add fusion leave Gemms that would otherwise stay FP32. The
    MatMul keeps the Gemm's node name, so fallback names stay valid."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    nodes, done = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if (node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or (has_bias and attrs.get("beta", 1.0) != 1.0)):
            nodes.append(node)
            continue
        b = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[b]).T.copy()
            b = f"{node.input[1]}_transposed_for_{node.name}"
            model.graph.initializer.append(numpy_helper.from_array(w, b))
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        done += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, dst)
    return done


def keras_layernorm_to_onnx(model) -> int:
    """Rewrite tf2onnx's lowering of Keras 3 ``LayerNormalization`` over the last axis of a 3-D
    tensor (mean and variance as GlobalAveragePool, ``x * m + (beta - mean * m)`` with
    ``m = gamma / sqrt(var + eps)``) as one ONNX ``LayerNormalization`` (opset >= 17), in place;
    returns how many. The fusion patterns of ``onnxruntime.transformers`` and ORT's session-level
    SkipLayerNormalization fusion start from that op (or from ReduceMean chains), never from this form."""
    from onnx import helper, numpy_helper

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 17:
        return 0
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in dict.fromkeys(n.input):  # Mul(d, d) is one consumer of d
            consumers.setdefault(i, []).append(n)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(g.value_info) + list(g.input)
             if v.type.tensor_type.HasField("shape")}

    def only(name, op):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def other(node, name):
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    removed: set[int] = set()
    added: list[tuple[int, object]] = []
    count = 0
    for pos, mean in enumerate(g.node):
        try:
            if mean.op_type != "GlobalAveragePool" or ranks.get(mean.input[0]) != 3:
                continue
            x, mu = mean.input[0], mean.output[0]
            users = consumers.get(mu, [])
            sub = next(n for n in users if n.op_type == "Sub" and list(n.input) == [x, mu])
            neg = next(n for n in users if n.op_type == "Neg")
            if len(users) != 2:
                continue
            sq = only(sub.output[0], "Mul")
            if sq is None or list(sq.input) != [sub.output[0]] * 2:
                continue
            var = only(sq.output[0], "GlobalAveragePool")
            add_eps = only(var.output[0], "Add") if var is not None else None
            eps = const(other(add_eps, var.output[0])) if add_eps is not None else None
            sqrt = only(add_eps.output[0], "Sqrt") if eps is not None and eps.size == 1 else None
            rec = only(sqrt.output[0], "Reciprocal") if sqrt is not None else None
            scale = only(rec.output[0], "Mul") if rec is not None else None
            gamma = const(other(scale, rec.output[0])) if scale is not None else None
            if gamma is None:
                continue
            m_users = consumers.get(scale.output[0], [])
            mul_neg = next(n for n in m_users if n.op_type == "Mul" and neg.output[0] in n.input)
            mul_x = next(n for n in m_users if n.op_type == "Mul" and x in n.input)
            if len(m_users) != 2 or only(neg.output[0], "Mul") is not mul_neg:
                continue
            add_beta = only(mul_neg.output[0], "Add")
            beta = const(other(add_beta, mul_neg.output[0])) if add_beta is not None else None
            out_add = only(mul_x.output[0], "Add")
            if beta is None or out_add is None or add_beta.output[0] not in out_add.input:
                continue
            if len(consumers.get(add_beta.output[0], [])) != 1:
                continue
        except StopIteration:
            continue
        hidden = gamma.size
        gname, bname = f"{mean.name}_ln_gamma", f"{mean.name}_ln_beta"
        g.initializer.extend([numpy_helper.from_array(gamma.reshape(hidden).astype(np.float32), gname),
                              numpy_helper.from_array(np.broadcast_to(beta.reshape(-1), (hidden,)).astype(np.float32), bname)])
        ln = helper.make_node("LayerNormalization", [x, gname, bname], [out_add.output[0]],
                              name=f"{mean.name}_LayerNormalization", axis=-1, epsilon=float(eps.reshape(-1)[0]))
        chain = (mean, sub, neg, sq, var, add_eps, sqrt, rec, scale, mul_neg, mul_x, add_beta, out_add)
        index = {id(n): i for i, n in enumerate(g.node)}
        removed |= {index[id(n)] for n in chain}
        added.append((max(index[id(n)] for n in chain), ln))
        count += 1
    if count:
        at = dict(added)
        nodes = []
        for i, n in enumerate(g.node):
            if i not in removed:
                nodes.append(n)
            if i in at:
                nodes.append(at[i])
        del g.node[:]
        g.node.extend(nodes)
    return count
