"""ONNX Runtime search space: knob values, weighted op types, fallback order."""
from __future__ import annotations

from typing import Mapping

from nano_tfx.backends.base import cpu_has_vnni  # noqa: F401 - re-exported (ONNX Runtime's knob)


DEFAULT_OPSET = 17
_OPSET_RANGE = (13, 17)

#: Op types whose weights make them worth keeping in FP32 (the fallback candidates).
STATIC_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM")
DYNAMIC_WEIGHTED_OPS = ("Conv", "MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")
#: Op types a static trial never quantizes. ORT pins a quantized Softmax's output to the range
#: [0, 1] (``BaseQuantizer.adjust_tensor_ranges``: uint8 steps of 1/255), so every probability
#: under ~0.002 becomes 0: a 1000-class classifier's output collapsed to zeros (random ViT-small:
#: output relative L2 0.98 to FP32; with Softmax in FP32 0.023, and not slower: 18.2 vs 20.0 ms).
#: The MatMul after an attention Softmax still quantizes its input, on the calibrated range.
FP32_OP_TYPES = ("Softmax",)
FP16_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")

FORMATS = ("QDQ", "QOperator")
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile")
METHODS = ("qlinear", "integer")
#: SmoothQuant alphas of static INT8 (``smooth_quant`` knob; None: off), tried in this order by
#: the default strategy when the diagnosis shows outlier channels: 0.5 is the SmoothQuant
#: paper's and INC's default, 0.75 moves more of the outliers into the weights
SMOOTH_QUANT_ALPHAS = (0.5, 0.75)
#: Knob names each kind of trial understands (anything else in a TrialConfig is an error).
KNOBS = {
    "static": {"approach", "format", "activation_type", "per_channel", "calibrate_method", "reduce_range",
               "smooth_quant"},
    "dynamic": {"approach", "per_channel", "weight_type", "quantize_conv", "reduce_range"},
    "fp16": set(),
}

def _order_by_sensitivity(names: list[str], spread: Mapping[str, float]) -> list[str]:
    """First and last weighted node first (classic sensitive layers), then by weight spread."""
    if len(names) <= 2:
        return list(names)
    head = [names[0], names[-1]]
    rest = names[1:-1]
    order = {n: i for i, n in enumerate(rest)}
    rest = sorted(rest, key=lambda n: (-spread.get(n, 0.0), order[n]))
    return head + rest
