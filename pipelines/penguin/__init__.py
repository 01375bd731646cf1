"""Penguin pipeline: ExampleGen → ... → Trainer → Evaluator → Quantizer → Pusher."""
