"""Two-operand einsum equations as one (batched) MatMul: the framework-free analysis behind the
Einsum rewrites of the OpenVINO model (``backends/openvino/rewrite.py``) and of the TF graph INC
quantizes (``backends/inc/rewrite.py``)."""
from __future__ import annotations

from typing import Sequence


class EinsumPlan:
    """How a two-operand einsum maps onto one (batched) MatMul.

    ``batch``: labels in both operands and the output (output order); ``m``: labels of the left
    operand only (+ output); ``k``: labels of both operands, not in the output (contracted);
    ``n``: labels of the right operand only (+ output). The MatMul computes
    ``[batch, M, K] x [batch, K, N] -> [batch, M, N]`` (groups merged); ``swap`` means the
    operands were exchanged so that the output needs no final Transpose when possible.
    """

    def __init__(self, left: str, right: str, out: str, swap: bool):
        self.left, self.right, self.out, self.swap = left, right, out, swap
        self.batch = [c for c in out if c in left and c in right]
        self.m = [c for c in left if c in out and c not in right]
        self.n = [c for c in right if c in out and c not in left]
        self.k = [c for c in left if c in right and c not in out]

    @property
    def result(self) -> str:
        """Labels of the MatMul output once its merged groups are split again."""
        return "".join(self.batch + self.m + self.n)

    def out_perm(self) -> list[int] | None:
        res = self.result
        perm = [res.index(c) for c in self.out]
        return None if perm == list(range(len(perm))) else perm


def parse_einsum(equation: str) -> EinsumPlan | None:
    """The MatMul plan of ``equation`` or None if it is not a plain two-operand contraction."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    ins, out = eq.split("->")
    ops = ins.split(",")
    if len(ops) != 2:
        return None
    a, b = ops
    labels = a + b + out
    if not labels.isalpha():
        return None
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None  # a trace / diagonal
    if any(c not in a and c not in b for c in out):
        return None
    if any(c not in out and not (c in a and c in b) for c in a + b):
        return None  # an index summed away within one operand: not a MatMul
    plan = EinsumPlan(a, b, out, False)
    # Exchange operands when the output lists the right operand's free labels before the left's:
    # MatMul(B, A) then yields the output order directly (no final Transpose).
    swapped = EinsumPlan(b, a, out, True)
    if plan.out_perm() is not None and swapped.out_perm() is None:
        return swapped
    return plan


def operand_layout(labels: str, batch: Sequence[str], outer: Sequence[str], inner: Sequence[str],
                   allow_transposed: bool = True) -> tuple[list[int] | None, bool]:
    """(perm, transposed): the Transpose bringing ``labels`` to ``batch + outer + inner`` (None if
    already there), or - when ``allow_transposed`` and that spares the Transpose - to
    ``batch + inner + outer`` with ``transposed`` True (MatMul's transpose_a/transpose_b)."""
    def perm_to(order):
        perm = [labels.index(c) for c in order]
        return None if perm == list(range(len(perm))) else perm

    straight = perm_to(list(batch) + list(outer) + list(inner))
    if straight is None or not allow_transposed:
        return straight, False
    flipped = perm_to(list(batch) + list(inner) + list(outer))
    if flipped is None:
        return None, True
    return straight, False


def label_sizes(plan: EinsumPlan, left_dims: Sequence[int | None], right_dims: Sequence[int | None]) -> dict:
    """Each label's size (None: dynamic) from the operands' static dims, the first known one."""
    sizes: dict[str, int | None] = {}
    for labels, dims in ((plan.left, left_dims), (plan.right, right_dims)):
        for c, d in zip(labels, dims):
            if sizes.get(c) is None:
                sizes[c] = d
    return sizes
