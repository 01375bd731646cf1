"""Digits pipeline: a small CNN on 8x8 digit images, quantized to INT8 before it is pushed.

CsvExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.
"""
