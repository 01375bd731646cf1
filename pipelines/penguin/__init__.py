"""Penguin pipeline: a tabular classifier on TFX's bundled penguin data, quantized to INT8.

ImportExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.
"""
from pipelines.runners import PipelineEntry

ENTRY = PipelineEntry(
    name="penguin_int8",
    kfp_name="penguin-int8",
    pipeline_module="pipelines.penguin.pipeline",
    image_data_root="/app/data/penguin",  # components/Dockerfile copies TFX's penguin data there
    defaults={"train_steps": 100, "accuracy_threshold": 0.6},
)
