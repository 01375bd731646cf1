"""TFX adapters of nano_tfx: the ``Quantizer`` component and its Trainer contract.

``components`` may import ``nano_tfx``; ``nano_tfx`` never imports TFX or ``components``.
Names are imported lazily: Beam workers that unpickle ``components.quantizer.*`` functions must
not pay for importing TFX (and TensorFlow) unless they use it.
"""
import importlib

import nano_tfx  # noqa: F401  (first: sets oneDNN before TensorFlow is imported)

_EXPORTS = {
    "FROM_TRANSFORMED_FEATURES": "components.quantizer.signatures",
    "quantizable_signatures": "components.quantizer.signatures",
    "QuantizationReport": "components.quantizer.artifacts",
    "Quantizer": "components.quantizer.component",
    "QuantizerSpec": "components.quantizer.component",
    "LatestQuantizationReportStrategy": "components.quantizer.resolver",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'components' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
