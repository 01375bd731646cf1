"""``nano-tfx serve``: every model layout nano-tfx writes, on the V2 Open Inference Protocol (MLServer).

``servable`` turns a model folder into named tensors in/out (TensorFlow parses the raw
``tf.Example``s and applies ``transform_graph/``; the model's own engine runs the rest);
``runtime`` is the MLServer custom runtime; ``server`` runs it in the foreground.
Imported lazily: ``components`` alone never needs MLServer.
"""
from components.serving.servable import RequestError, Servable, load_servable

__all__ = ["RequestError", "Servable", "load_servable"]
