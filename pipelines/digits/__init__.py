"""Digits pipeline: a small CNN on 8x8 digit images, quantized to INT8 before it is pushed.

CsvExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.
"""
from pipelines.runners import PipelineEntry

ENTRY = PipelineEntry(
    name="digits_int8",
    kfp_name="digits-int8",
    pipeline_module="pipelines.digits.pipeline",
    image_data_root="/app/pipelines/digits/data",  # where components/Dockerfile puts the repository
    defaults={"train_steps": 300, "accuracy_threshold": 0.9},
)
