"""Einsum / 3-D BatchMatMulV2 rewrites into MatMul form (OpenVINO IR, INC's TF graph).

A tiny encoder block (MultiHeadAttention + Dense on a 3-D input + LayerNormalization, seq 16,
hidden 32, 2 heads) in Keras 3 and tf_keras, exported as nano-tfx does. Each rewrite must leave
no Einsum behind, keep FP32 outputs (1e-5) and make the MatMuls quantizable.
"""
import collections

import numpy as np
import pytest

SEQ, HIDDEN, HEADS = 16, 32, 2


def _encoder(flavor: str):
    if flavor == "keras3":
        import keras
    else:
        import tf_keras as keras
    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((SEQ, HIDDEN), name="x")
    a = L.MultiHeadAttention(num_heads=HEADS, key_dim=HIDDEN // HEADS, name="mha")(x, x)
    h = L.LayerNormalization(name="ln1")(x + a)
    f = L.Dense(2 * HIDDEN, activation="relu", name="ff1")(h)
    f = L.Dense(HIDDEN, name="ff2")(f)
    o = L.LayerNormalization(name="ln2")(h + f)
    return keras.Model(x, L.Dense(4, name="head")(o[:, 0, :]))


@pytest.fixture(scope="module", params=["keras3", "tf_keras"])
def encoder_source(request, tmp_path_factory):
    from nano_tfx.interchange import to_saved_model

    workdir = str(tmp_path_factory.mktemp(f"enc_{request.param}"))
    return request.param, to_saved_model(_encoder(request.param), workdir, None, "serving_default", None)


def _inputs(batch=3, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# equation planning
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("equation", ["abc,cde->abde", "abcd,cde->abe", "aecd,abcd->acbe", "acbe,aecd->abcd",
                                      "BTNH,BSNH->BNTS", "BNTS,BSNH->BTNH", "ij,kj->ik", "ab,cd->abcd"])
def test_parse_einsum_plans_matmuls(equation):
    from nano_tfx.backends.einsum import parse_einsum

    plan = parse_einsum(equation)
    assert plan is not None
    assert sorted(plan.batch + plan.m + plan.n) == sorted(equation.split("->")[1])


@pytest.mark.parametrize("equation", ["ii->i", "abc->cb", "a...c,cd->a...d", "abc,cd,de->abe", "abc,cd->ad"])
def test_parse_einsum_refuses_non_matmuls(equation):
    from nano_tfx.backends.einsum import parse_einsum

    assert parse_einsum(equation) is None


# --------------------------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------------------------
def _ov_counts(model):
    return collections.Counter(op.get_type_name() for op in model.get_ops())


@pytest.mark.parametrize("equation,sa,sb,const_b", [
    ("abc,cde->abde", (3, 5, 8), (8, 2, 4), True),
    ("abcd,cde->abe", (3, 5, 2, 4), (2, 4, 6), True),
    ("aecd,abcd->acbe", (3, 5, 2, 4), (3, 7, 2, 4), False),
    ("acbe,aecd->abcd", (3, 2, 7, 5), (3, 5, 2, 4), False),
    ("BTNH,BSNH->BNTS", (3, 5, 2, 4), (3, 7, 2, 4), False),
    ("BNTS,BSNH->BTNH", (3, 2, 5, 7), (3, 7, 2, 4), False),
    ("ij,kj->ik", (3, 4), (5, 4), False),
    ("cde,abc->abde", (8, 2, 4), (3, 5, 8), False),
    ("ab,cd->abcd", (2, 3), (4, 5), False),
])
def test_openvino_einsum_equations(equation, sa, sb, const_b):
    import openvino as ov
    import openvino.runtime.opset13 as ops

    from nano_tfx.backends.openvino.rewrite import rewrite_einsum

    rng = np.random.default_rng(0)
    a = ops.parameter(ov.PartialShape([-1] + list(sa[1:])), ov.Type.f32, name="a")  # dynamic batch
    params = [a]
    if const_b:
        b = ops.constant(rng.standard_normal(sb).astype(np.float32))
    else:
        b = ops.parameter(ov.PartialShape(list(sb)), ov.Type.f32, name="b")
        params.append(b)
    einsum = ops.einsum([a, b], equation)
    einsum.set_friendly_name("the_einsum")
    einsum.output(0).get_tensor().set_names({"out"})
    model = ov.Model([ops.result(einsum)], params)
    feeds = [rng.standard_normal(sa).astype(np.float32)]
    if not const_b:
        feeds.append(rng.standard_normal(sb).astype(np.float32))
    core, cfg = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    ref = core.compile_model(model, "CPU", cfg)(feeds)[0]
    assert rewrite_einsum(model) == 1
    counts = _ov_counts(model)
    assert counts["Einsum"] == 0 and counts["MatMul"] == 1
    assert [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"] == ["the_einsum"]
    assert "out" in model.output(0).get_names()
    got = core.compile_model(model, "CPU", cfg)(feeds)[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_openvino_leaves_unsupported_einsum():
    import openvino as ov
    import openvino.runtime.opset13 as ops

    from nano_tfx.backends.openvino.rewrite import rewrite_einsum

    a = ops.parameter(ov.PartialShape([3, 3]), ov.Type.f32)
    model = ov.Model([ops.result(ops.einsum([a], "ii->i"))], [a])
    assert rewrite_einsum(model) == 0
    assert _ov_counts(model)["Einsum"] == 1


def test_openvino_encoder_rewrite(encoder_source, tmp_path, monkeypatch):
    """Keras 3: 2 Einsums (attention), 7 MatMuls; tf_keras: 6 Einsums, 3 MatMuls. After: 9
    MatMuls, 0 Einsum, same FP32 outputs, NNCF quantizes the new MatMuls."""
    import nncf
    import openvino as ov

    from nano_tfx.backends.base import BackendOptions, backend_class
    from nano_tfx.backends.openvino.coverage import count
    from nano_tfx.backends.openvino.rewrite import hoist_product_scale, rewrite_einsum

    import nano_tfx.backends.openvino.backend as ov_backend

    flavor, source = encoder_source
    # the backend's prepare rewrites; the graph before it is prepare without the rewrite
    assert _ov_counts(backend_class("openvino")(BackendOptions()).prepare(
        source, str(tmp_path / "wired")).model())["Einsum"] == 0
    monkeypatch.setattr(ov_backend, "rewrite_einsum", lambda model: 0)
    prepared = backend_class("openvino")(BackendOptions()).prepare(source, str(tmp_path))
    before, after = prepared.model(), prepared.model()
    expected_einsums = {"keras3": 2, "tf_keras": 6}[flavor]
    assert _ov_counts(before)["Einsum"] == expected_einsums
    assert rewrite_einsum(after) == expected_einsums
    # Keras 3 scales Q.K^T after the product (tf_keras scales the query before it)
    assert hoist_product_scale(after) == {"keras3": 1, "tf_keras": 0}[flavor]
    counts = _ov_counts(after)
    assert counts["Einsum"] == 0 and counts["MatMul"] == 9
    assert after.output(0).get_names() == before.output(0).get_names()

    core, cfg = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    x = _inputs()
    ref = core.compile_model(before, "CPU", cfg)([x])[0]
    got = core.compile_model(after, "CPU", cfg)([x])[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

    # INT8 coverage (MatMul kernels running in INT8 on the CPU plugin's runtime graph)
    calib = nncf.Dataset([_inputs(1, seed) for seed in range(3)])
    covered = {}
    for tag, model in (("before", before), ("after", after)):
        q = nncf.quantize(model.clone(), calib, subset_size=3, fast_bias_correction=True)
        covered[tag] = count(core.compile_model(q, "CPU", cfg)).get("MatMul", [0, 0])[0]
    # measured: Keras 3 7 -> 9 of 9, tf_keras 3 -> 9 of 9 (without the scale hoisted, Keras 3's
    # Q.K^T product ran fused with its scale as an FP32 kernel: 8 of 9)
    assert covered["after"] == 9 and covered["after"] >= covered["before"] + 2, covered


def _product_then(scale_data, weight_b=False, second_consumer=False):
    """a [2,4,8] x b [2,8,5] (or a constant b) -> MatMul -> Multiply(scale) -> Softmax."""
    import openvino as ov
    import openvino.runtime.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter(ov.PartialShape([-1, 4, 8]), ov.Type.f32, name="a")
    params = [a]
    if weight_b:
        b = ops.constant(rng.standard_normal((8, 5)).astype(np.float32))
    else:
        b = ops.parameter(ov.PartialShape([-1, 8, 5]), ov.Type.f32, name="b")
        params.append(b)
    mm = ops.matmul(a, b, False, False)
    mm.set_friendly_name("scores")
    mul = ops.multiply(mm, ops.constant(np.asarray(scale_data, dtype=np.float32)))
    mul.output(0).get_tensor().set_names({"scaled"})
    results = [ops.result(ops.softmax(mul, -1))]
    if second_consumer:
        results.append(ops.result(ops.relu(mm)))
    return ov.Model(results, params)


@pytest.mark.parametrize("scale", [0.25, [[[0.25]]]], ids=["scalar", "size-1"])
def test_openvino_scale_after_an_activation_product_moves_onto_its_input(scale):
    import openvino as ov

    from nano_tfx.backends.openvino.rewrite import hoist_product_scale

    model = _product_then(scale)
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal((2, 4, 8)).astype(np.float32), rng.standard_normal((2, 8, 5)).astype(np.float32)]
    core, cfg = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    ref = core.compile_model(model, "CPU", cfg)(feeds)[0]
    assert hoist_product_scale(model) == 1
    mm = next(op for op in model.get_ops() if op.get_type_name() == "MatMul")
    assert mm.get_friendly_name() == "scores"
    assert [v.get_node().get_type_name() for v in mm.input_values()] == ["Multiply", "Parameter"]
    assert next(op for op in model.get_ops() if op.get_type_name() == "Softmax").input_value(0).get_node() is mm
    assert "scaled" in mm.output(0).get_names()
    np.testing.assert_allclose(core.compile_model(model, "CPU", cfg)(feeds)[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["per-channel scale", "weight operand", "product used twice"])
def test_openvino_scale_stays_where_moving_it_would_change_or_gain_nothing(case):
    from nano_tfx.backends.openvino.rewrite import hoist_product_scale

    model = _product_then(np.linspace(0.1, 0.5, 5) if case == "per-channel scale" else 0.25,
                          weight_b=case == "weight operand", second_consumer=case == "product used twice")
    before = _ov_counts(model)
    assert hoist_product_scale(model) == 0 and _ov_counts(model) == before


# --------------------------------------------------------------------------------------------
# INC (TF GraphDef)
# --------------------------------------------------------------------------------------------
def _tf_counts(graph_def):
    return collections.Counter(n.op for n in graph_def.node)


def _run_graph(graph_def, feed: str, fetch: str, x):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run(f"{fetch}:0", {f"{feed}:0": x})


def test_inc_graph_def_rewrite(encoder_source):
    """Keras 3: 6 BatchMatMulV2 (EinsumDense projections, 3-D Dense) + 2 Einsums; tf_keras: 6
    Einsums. After: every weighted product is a 2-D MatMul (7 + the head), the two attention
    products BatchMatMulV2, no Einsum, same FP32 outputs."""
    from nano_tfx.backends.inc.convert import _frozen_graph
    from nano_tfx.backends.inc.rewrite import rewrite_graph_def

    flavor, source = encoder_source
    graph_def, ins, outs = _frozen_graph(source)
    before = _tf_counts(graph_def)
    assert before["Einsum"] == {"keras3": 2, "tf_keras": 6}[flavor]
    new, stats = rewrite_graph_def(graph_def, keep=ins + outs)
    after = _tf_counts(new)
    assert after["Einsum"] == 0
    assert after["MatMul"] == 7
    assert after["BatchMatMulV2"] == 2  # activation x activation (attention): not INC-quantizable
    assert stats.einsum_to_batch_matmul == 2 and not stats.skipped
    assert stats.biases_moved >= 3
    # the 2-D MatMuls keep the original op names
    names = {n.name for n in new.node if n.op == "MatMul"}
    assert names <= {n.name for n in graph_def.node}
    x = _inputs()
    np.testing.assert_allclose(_run_graph(new, ins[0], outs[0], x), _run_graph(graph_def, ins[0], outs[0], x),
                               atol=1e-5, rtol=0)


def test_inc_rewrite_dynamic_leading_dims():
    """A 3-D Dense / EinsumDense whose batch *and* sequence dims are unknown: the output shape is
    computed at run time."""
    import tensorflow as tf

    from nano_tfx.backends.inc.rewrite import rewrite_graph_def

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 2, 4)).astype(np.float32)
    w2 = rng.standard_normal((8, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, None, 8], name="x")
        y1 = tf.einsum("abc,cde->abde", x, tf.constant(w1))
        y2 = tf.nn.bias_add(tf.linalg.matmul(x, tf.constant(w2)), tf.constant(bias))
        tf.identity(tf.reduce_sum(y1, axis=[2, 3]) + tf.reduce_sum(y2, axis=2), name="y")
    graph_def = graph.as_graph_def()
    new, stats = rewrite_graph_def(graph_def, keep=["x", "y"])
    assert _tf_counts(new)["Einsum"] == 0 and _tf_counts(new)["MatMul"] == 2
    assert stats.einsum_to_matmul == 1 and stats.batch_matmul_to_matmul == 1 and stats.biases_moved == 1
    feed = rng.standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_graph(new, "x", "y", feed), _run_graph(graph_def, "x", "y", feed),
                               atol=1e-5, rtol=0)


def test_inc_rewrite_saved_model(encoder_source, tmp_path):
    """The rewritten graph as a SavedModel (what INC's fit() loads): same IO names, same
    outputs, re-frozen with no Einsum."""
    import tensorflow as tf

    from nano_tfx.backends.inc.convert import _frozen_graph
    from nano_tfx.backends.inc.rewrite import rewrite_saved_model

    _, source = encoder_source
    rewritten, stats = rewrite_saved_model(source, str(tmp_path / "inc_rewritten"))
    assert rewritten is not None and stats.changed
    assert rewritten.input_names == source.input_names and rewritten.output_names == source.output_names
    graph_def, _, _ = _frozen_graph(rewritten)
    assert _tf_counts(graph_def)["Einsum"] == 0 and _tf_counts(graph_def)["MatMul"] == 7
    x = tf.constant(_inputs())
    _, f0 = source.load_signature()
    _, f1 = rewritten.load_signature()
    name = source.output_names[0]
    np.testing.assert_allclose(f1(**{source.input_names[0]: x})[name].numpy(),
                               f0(**{source.input_names[0]: x})[name].numpy(), atol=1e-5, rtol=0)
