"""Reviews pipeline: a small Keras transformer classifier on TFX's bundled IMDB reviews (text),
quantized to INT8 before it is pushed.

CsvExampleGen → StatisticsGen → SchemaGen → Transform (tokenize + vocabulary) → Trainer →
Evaluator → Quantizer → Pusher.
"""
from pipelines.runners import PipelineEntry

ENTRY = PipelineEntry(
    name="reviews_int8",
    kfp_name="reviews-int8",
    pipeline_module="pipelines.reviews.pipeline",
    image_data_root="/app/data/reviews",  # components/Dockerfile copies TFX's IMDB sample there
    defaults={"train_steps": 60, "accuracy_threshold": 0.0, "accelerator": "onnxruntime"},
)
