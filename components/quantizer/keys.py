"""Channel keys of the Quantizer's spec, in one place (as TFX's ``standard_component_specs.py``):
the spec declares them, the executor reads its ``input_dict`` / ``output_dict`` by them."""

# inputs
MODEL_KEY = "model"
EXAMPLES_KEY = "examples"
TRANSFORM_GRAPH_KEY = "transform_graph"
EVALUATION_KEY = "evaluation"
MODEL_BLESSING_KEY = "model_blessing"
PREVIOUS_REPORT_KEY = "previous_report"
RAW_EXAMPLES_KEY = "raw_examples"
# outputs
QUANTIZED_MODEL_KEY = "quantized_model"
BLESSING_KEY = "blessing"
REPORT_KEY = "report"
