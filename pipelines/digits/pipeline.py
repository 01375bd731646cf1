"""Digits pipeline: train a small CNN, gate it, quantize it to INT8 under an accuracy bar, push it.

CsvExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.

The Evaluator blesses the FP32 model (accuracy ≥ ``accuracy_threshold`` and no regression vs. the
latest blessed model); the Quantizer only quantizes a blessed model and blesses the INT8 model
only when it meets ``accuracy_criterion`` *and* the Evaluator's threshold; the Pusher pushes the
*quantized* model, only when the Quantizer blessed it.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from components import LatestQuantizationReportStrategy, QuantizationReport, Quantizer
from pipelines.digits.features import LABEL_KEY, LABEL_XF

_UTILS = "pipelines.digits.digits_utils"
DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def make_eval_config(
    label_key: str = LABEL_KEY,
    accuracy_threshold: float = 0.9,
    change_threshold: Optional[float] = -1e-10,
) -> tfma.EvalConfig:
    """TFMA config over raw examples (``serving_default``): accuracy bar on the overall slice."""
    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": accuracy_threshold})
    )
    if change_threshold is not None:
        threshold.change_threshold.CopyFrom(
            tfma.GenericChangeThreshold(
                direction=tfma.MetricDirection.HIGHER_IS_BETTER, absolute={"value": change_threshold}
            )
        )
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(signature_name="serving_default", label_key=label_key)],
        slicing_specs=[tfma.SlicingSpec()],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="SparseCategoricalAccuracy", threshold=threshold),
                    tfma.MetricConfig(class_name="ExampleCount"),
                ]
            )
        ],
    )


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    serving_model_dir: str,
    metadata_path: Optional[str] = None,
    data_root: str = DATA_ROOT,
    train_steps: int = 300,
    eval_steps: int = 10,
    hparams: Optional[Mapping[str, Any]] = None,
    accuracy_threshold: float = 0.9,
    change_threshold: Optional[float] = -1e-10,
    accelerator: Optional[str] = None,
    precision: str = "int8",
    accuracy_criterion: Optional[Mapping[str, Any]] = None,
    metric: Optional[str] = None,
    tuning_strategy: Optional[str] = None,
    max_trials: Optional[int] = None,
    timeout: float = 0,
    calibration_split: str = "train",
    evaluation_split: str = "eval",
    sample_size: int = 100,
    quantizer_batch_size: Optional[int] = None,
    signature_name: str = "from_transformed_features",
    resume_from_previous_report: bool = True,
    previous_report_strategy: Optional[type] = None,
    quantizer_beam_pipeline_args: Optional[Sequence[str]] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    enable_cache: bool = True,
) -> tfx.dsl.Pipeline:
    """The digits pipeline; every knob is an argument (runners, the CLI and tests set them).

    Args:
      pipeline_name, pipeline_root: TFX pipeline identity and artifact root.
      serving_model_dir: the Pusher's filesystem destination (one numeric version dir per push).
      metadata_path: SQLite MLMD file for local/Airflow runs; None for orchestrators that bring
        their own metadata store (Kubeflow).
      data_root: directory with ``train/*.csv`` and ``eval/*.csv`` (default: the bundled data).
      train_steps, eval_steps, hparams: Trainer steps and ``digits_utils.make_model`` kwargs.
      accuracy_threshold, change_threshold: the Evaluator's value bar and its allowed change
        vs. the latest blessed model (None: no comparison).
      accelerator … signature_name: the ``Quantizer``'s parameters (``quantizer_batch_size`` is
        its ``batch_size``).
      resume_from_previous_report: feed the latest ``QuantizationReport`` back to the Quantizer
        so reruns reuse finished trials of the same model and request.
      previous_report_strategy: the resolver strategy picking that report; default
        ``components.LatestQuantizationReportStrategy`` (newest report with trials; nothing on a
        first run). Kubeflow v2 only compiles TFX's built-in strategies: its runner passes
        ``tfx.dsl.experimental.LatestArtifactStrategy``.
      quantizer_beam_pipeline_args: Beam args for the Quantizer only (e.g. trials on Dask).
      beam_pipeline_args: Beam args of every Beam-based component.
      enable_cache: TFX caching of unchanged component runs.
    """
    example_gen = tfx.components.CsvExampleGen(
        input_base=data_root,
        input_config=tfx.proto.Input(
            splits=[
                tfx.proto.Input.Split(name="train", pattern="train/*.csv"),
                tfx.proto.Input.Split(name="eval", pattern="eval/*.csv"),
            ]
        ),
    )
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(
        statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True
    )
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=f"{_UTILS}.preprocessing_fn",
    )
    trainer = tfx.components.Trainer(
        run_fn=f"{_UTILS}.run_fn",
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(num_steps=train_steps),
        eval_args=tfx.proto.EvalArgs(num_steps=eval_steps),
        custom_config={"hparams": dict(hparams or {})},
    )
    model_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=model_resolver.outputs["model"],
        eval_config=make_eval_config(LABEL_KEY, accuracy_threshold, change_threshold),
    )
    components = [example_gen, statistics_gen, schema_gen, transform, trainer, model_resolver, evaluator]

    previous_report = None
    if resume_from_previous_report:
        report_resolver = tfx.dsl.Resolver(
            strategy_class=previous_report_strategy or LatestQuantizationReportStrategy,
            report=tfx.dsl.Channel(type=QuantizationReport),
        ).with_id("latest_quantization_report_resolver")
        components.append(report_resolver)
        previous_report = report_resolver.outputs["report"]

    quantizer = Quantizer(
        model=trainer.outputs["model"],
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        evaluation=evaluator.outputs["evaluation"],
        model_blessing=evaluator.outputs["blessing"],
        previous_report=previous_report,
        accelerator=accelerator,
        precision=precision,
        accuracy_criterion=accuracy_criterion,
        metric=metric,
        label_key=LABEL_XF,
        tuning_strategy=tuning_strategy,
        max_trials=max_trials,
        timeout=timeout,
        calibration_split=calibration_split,
        evaluation_split=evaluation_split,
        sample_size=sample_size,
        batch_size=quantizer_batch_size,
        signature_name=signature_name,
    )
    if quantizer_beam_pipeline_args is not None:
        quantizer.with_beam_pipeline_args(list(quantizer_beam_pipeline_args))
    pusher = tfx.components.Pusher(
        model=quantizer.outputs["quantized_model"],
        model_blessing=quantizer.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_model_dir)
        ),
    )
    components += [quantizer, pusher]
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=(
            tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
            if metadata_path
            else None
        ),
        beam_pipeline_args=list(beam_pipeline_args or []),
    )
