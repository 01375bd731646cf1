"""``Quantizer``: a custom TFX Beam component for accuracy-controlled post-training quantization.

Inputs: the Trainer's ``model`` (with the ``from_transformed_features`` signature, see
``quantizable_signatures``), Transform's ``transformed_examples`` and ``transform_graph``, and
optionally the Evaluator's ``evaluation`` / ``blessing`` (FP32 baseline, value thresholds, gate)
and a ``previous_report`` (resume). Outputs: ``quantized_model`` (Model), ``blessing``
(ModelBlessing, what the Pusher checks) and ``report`` (QuantizationReport).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from tfx.dsl.components.base import base_beam_component, executor_spec
from tfx.types import channel, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components.quantizer import executor
from components.quantizer.artifacts import QuantizationReport
from components.quantizer.keys import (
    BLESSING_KEY, EVALUATION_KEY, EXAMPLES_KEY, MODEL_BLESSING_KEY, MODEL_KEY, PREVIOUS_REPORT_KEY,
    QUANTIZED_MODEL_KEY, RAW_EXAMPLES_KEY, REPORT_KEY, TRANSFORM_GRAPH_KEY,
)
from components.quantizer.signatures import FROM_TRANSFORMED_FEATURES
from components.quantizer.validation import DEFAULT_MIN_SPEEDUP, validate_parameters


class QuantizerSpec(ComponentSpec):
    """ComponentSpec of the Quantizer."""

    PARAMETERS = {
        "accelerator": ExecutionParameter(type=str, optional=True),
        "precision": ExecutionParameter(type=str),
        # JSON of the Keras API's accuracy_criterion dict.
        "accuracy_criterion": ExecutionParameter(type=str, optional=True),
        "metric": ExecutionParameter(type=str, optional=True),
        "label_key": ExecutionParameter(type=str, optional=True),
        "tuning_strategy": ExecutionParameter(type=str, optional=True),
        "max_trials": ExecutionParameter(type=int, optional=True),
        "timeout": ExecutionParameter(type=float, optional=True),
        "calibration_split": ExecutionParameter(type=str),
        "evaluation_split": ExecutionParameter(type=str),
        "sample_size": ExecutionParameter(type=int),
        "batch_size": ExecutionParameter(type=int, optional=True),
        "signature_name": ExecutionParameter(type=str),
        # FP32 batch-1 time / quantized time the blessed model must reach (0 = no speed gate).
        "min_speedup": ExecutionParameter(type=float, optional=True),
        # "full" | "sequential": each trial on the whole evaluation split, or on as few examples as
        # the criterion needs (nano_tfx.tuning.paired_eval), at this confidence
        "trial_evaluation": ExecutionParameter(type=str, optional=True),
        "confidence": ExecutionParameter(type=float, optional=True),
    }
    INPUTS = {
        MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples),
        TRANSFORM_GRAPH_KEY: ChannelParameter(type=standard_artifacts.TransformGraph),
        EVALUATION_KEY: ChannelParameter(type=standard_artifacts.ModelEvaluation, optional=True),
        MODEL_BLESSING_KEY: ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
        PREVIOUS_REPORT_KEY: ChannelParameter(type=QuantizationReport, optional=True),
        RAW_EXAMPLES_KEY: ChannelParameter(type=standard_artifacts.Examples, optional=True),
    }
    OUTPUTS = {
        QUANTIZED_MODEL_KEY: ChannelParameter(type=standard_artifacts.Model),
        BLESSING_KEY: ChannelParameter(type=standard_artifacts.ModelBlessing),
        REPORT_KEY: ChannelParameter(type=QuantizationReport),
    }


class Quantizer(base_beam_component.BaseBeamComponent):
    """Quantize the Trainer's model to INT8 (or another precision) under an accuracy bar.

    Args:
      model: Trainer ``model`` channel; the SavedModel must export ``signature_name``
        (default ``from_transformed_features``, see ``quantizable_signatures``).
      examples: Transform ``transformed_examples`` channel (calibration + evaluation data).
      transform_graph: Transform ``transform_graph`` channel (re-attached in front of the
        quantized model so ``serving_default`` keeps taking serialized raw tf.Examples).
      evaluation: optional Evaluator ``evaluation``: FP32 baseline metric (overall slice) and the
        value thresholds the INT8 metric must also meet.
      model_blessing: optional Evaluator ``blessing``: if the FP32 model is not blessed, nothing
        is quantized nor blessed.
      previous_report: optional earlier ``report``: finished trials for the same model
        fingerprint and configuration are reused (resume instead of repeat).
      raw_examples: optional ExampleGen ``examples`` (the raw tf.Examples requests carry). With
        several finalists (``accelerator='auto'``, ``precision='auto'``) they are timed again
        as served: each saved as its serving layout behind one local ``nano-tfx serve``, raw
        examples of the evaluation split sent over HTTP (parse + tf.Transform, then the engine),
        and the fastest served one is blessed (``served_timing``; in-process if no server starts).
      accelerator: None (Intel Neural Compressor, TF graph), 'onnxruntime', 'openvino' or 'auto'.
      precision: 'int8' (default), another precision the accelerator supports, or 'auto': the
        precision ladder (INT8 → INT8 with BF16 fallback layers → BF16 → the engine's FP32),
        the fastest rung that meets the criterion is blessed (its precision in the message).
      accuracy_criterion: same dict as the Keras API; bounds the metric drop vs. FP32
        (default: 1 % relative).
      metric: metric to compare (a Keras metric name); default: the Evaluator's first metric.
      label_key: transformed label feature; default: the Evaluator's label key when it is a
        transformed feature, else the one transformed feature the model does not consume.
      tuning_strategy, max_trials, timeout: tuner controls (as in the Keras API).
      calibration_split / evaluation_split: splits of ``examples`` (default train / eval).
      sample_size: number of calibration samples drawn (in Beam, bounded memory).
      batch_size: batch size of calibration / evaluation batches.
      signature_name: signature of the Trainer model to quantize.
      min_speedup: the blessed model must be at least this many times faster than the FP32
        signature it replaces (batch 1, timed side by side in the executor); default 1.0: never
        bless a slower model. 0 or None: no speed gate (the speed-up is still reported). When
        the gate blocks, push the FP32 model instead (``build_pipeline(fp32_serving_model_dir=...)``).
    """

    SPEC_CLASS = QuantizerSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

    def __init__(
        self,
        model: channel.BaseChannel,
        examples: channel.BaseChannel,
        transform_graph: channel.BaseChannel,
        evaluation: Optional[channel.BaseChannel] = None,
        model_blessing: Optional[channel.BaseChannel] = None,
        previous_report: Optional[channel.BaseChannel] = None,
        raw_examples: Optional[channel.BaseChannel] = None,
        accelerator: Optional[str] = None,
        precision: str = "int8",
        accuracy_criterion: Optional[Mapping[str, Any]] = None,
        metric: Optional[str] = None,
        label_key: Optional[str] = None,
        tuning_strategy: Optional[str] = None,
        max_trials: Optional[int] = None,
        timeout: float = 0,
        calibration_split: str = "train",
        evaluation_split: str = "eval",
        sample_size: int = 100,
        batch_size: Optional[int] = None,
        signature_name: str = FROM_TRANSFORMED_FEATURES,
        min_speedup: Optional[float] = DEFAULT_MIN_SPEEDUP,
        trial_evaluation: str = "full",
        confidence: float = 0.99,
    ):
        params = validate_parameters(
            accelerator=accelerator,
            precision=precision,
            accuracy_criterion=accuracy_criterion,
            metric=metric,
            label_key=label_key,
            tuning_strategy=tuning_strategy,
            max_trials=max_trials,
            timeout=timeout,
            calibration_split=calibration_split,
            evaluation_split=evaluation_split,
            sample_size=sample_size,
            batch_size=batch_size,
            signature_name=signature_name,
            min_speedup=min_speedup,
            trial_evaluation=trial_evaluation,
            confidence=confidence,
        )
        if params["accuracy_criterion"] is not None:
            params["accuracy_criterion"] = json.dumps(params["accuracy_criterion"], sort_keys=True)
        spec = QuantizerSpec(
            model=model,
            examples=examples,
            transform_graph=transform_graph,
            evaluation=evaluation,
            model_blessing=model_blessing,
            previous_report=previous_report,
            raw_examples=raw_examples,
            quantized_model=channel.Channel(type=standard_artifacts.Model),
            blessing=channel.Channel(type=standard_artifacts.ModelBlessing),
            report=channel.Channel(type=QuantizationReport),
            **params,
        )
        super().__init__(spec=spec)
