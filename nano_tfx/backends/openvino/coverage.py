"""INT8 coverage of a compiled OpenVINO model (see ``nano_tfx.coverage``).

Counted on the CPU plugin's runtime graph (``CompiledModel.get_runtime_model()``): each node
there is a kernel that really runs, and carries its ``layerType`` (``FullyConnected``,
``Convolution``, ``MatMul``, ...) and the precision it computes in (``runtimePrecision``: ``I8``
or ``U8`` for INT8 kernels, ``FP32``/``BF16``/``FP16`` otherwise). This is truer than counting
the FakeQuantize nodes NNCF placed: the plugin may decline to fuse a FakeQuantize (and keep
the op in FP32), and a BF16/FP16 hint changes the precision of what is not INT8.
"""
from __future__ import annotations

from nano_tfx.coverage import Int8Ops, tally

#: runtime precisions of INT8 kernels
INT8_PRECISIONS = frozenset({"I8", "U8"})


def _info(op, key: str) -> str:
    rt = op.get_rt_info()
    return str(rt[key].astype(str)) if key in rt else ""


def count(compiled) -> Int8Ops:
    """``{kind: [int8, total]}`` over the runtime graph of ``compiled`` (an ``ov.CompiledModel``)."""
    ops = compiled.get_runtime_model().get_ops()
    return tally((_info(op, "layerType"), _info(op, "runtimePrecision").upper() in INT8_PRECISIONS) for op in ops)
