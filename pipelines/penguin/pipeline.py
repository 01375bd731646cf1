"""Penguin pipeline with INT8 quantization gated by the Evaluator.

ExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.
The Pusher pushes the *quantized* model, and only when the Quantizer blessed it (which requires
the Evaluator to have blessed the FP32 model first).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Mapping, Sequence

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from components import LatestQuantizationReportStrategy, QuantizationReport, Quantizer
from components.quantizer.validation import validate_parameters

_UTILS = "pipelines.penguin.penguin_utils"


def penguin_data_root() -> str:
    """TFX's bundled penguin data (TFRecords of tf.Examples, Split-train / Split-eval)."""
    import tfx as tfx_pkg

    return os.path.join(os.path.dirname(tfx_pkg.__file__), "components", "testdata", "penguin", "data")


def _example_gen(data_root: str):
    """CsvExampleGen for a directory of CSVs, ImportExampleGen for TFX's pre-split TFRecords."""
    if glob.glob(os.path.join(data_root, "*.csv")):
        return tfx.components.CsvExampleGen(input_base=data_root)
    splits = sorted(
        d[len("Split-"):] for d in os.listdir(data_root) if d.startswith("Split-")
    )
    if not splits:
        raise ValueError(f"data_root: {data_root!r} has neither *.csv nor Split-* TFRecord directories")
    return tfx.components.ImportExampleGen(
        input_base=data_root,
        input_config=tfx.proto.Input(
            splits=[tfx.proto.Input.Split(name=s, pattern=f"Split-{s}/*") for s in splits]
        ),
    )


def make_eval_config(
    label_key: str = "species",
    accuracy_threshold: float = 0.6,
    change_threshold: float | None = -1e-10,
) -> tfma.EvalConfig:
    """Evaluator config over raw examples (``serving_default``), overall slice."""
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
    metadata_path: str,
    data_root: str | None = None,
    train_steps: int = 100,
    eval_steps: int = 5,
    hparams: Mapping[str, Any] | None = None,
    accuracy_threshold: float = 0.6,
    change_threshold: float | None = -1e-10,
    accelerator: str | None = None,
    precision: str = "int8",
    accuracy_criterion: Mapping[str, Any] | None = None,
    metric: str | None = None,
    tuning_strategy: str | None = None,
    max_trials: int | None = None,
    timeout: float = 0,
    calibration_split: str = "train",
    evaluation_split: str = "eval",
    sample_size: int = 100,
    signature_name: str = "from_transformed_features",
    resume_from_previous_report: bool = True,
    quantizer_beam_pipeline_args: Sequence[str] | None = None,
    beam_pipeline_args: Sequence[str] | None = None,
    enable_cache: bool = True,
    with_quantizer: bool = True,
) -> tfx.dsl.Pipeline:
    """Every knob of the pipeline is an argument (tests and ``local_runner`` set them).

    ``resume_from_previous_report`` wires the latest ``QuantizationReport`` of this pipeline
    back into the Quantizer, so a rerun reuses trials already evaluated for the same model and
    configuration. ``quantizer_beam_pipeline_args`` override the pipeline's Beam args for the
    Quantizer only (e.g. to run its trials on another Beam runner). ``with_quantizer=False``
    stops after the Evaluator (the FP32 pipeline; used to make test artifacts).
    """
    # Fail fast on bad Quantizer knobs, before any other component is built.
    validate_parameters(
        accelerator=accelerator, precision=precision, accuracy_criterion=accuracy_criterion,
        metric=metric, label_key=None, tuning_strategy=tuning_strategy, max_trials=max_trials,
        timeout=timeout, calibration_split=calibration_split, evaluation_split=evaluation_split,
        sample_size=sample_size, batch_size=None, signature_name=signature_name,
    )
    example_gen = _example_gen(data_root or penguin_data_root())
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
        eval_config=make_eval_config("species", accuracy_threshold, change_threshold),
    )
    components = [example_gen, statistics_gen, schema_gen, transform, trainer, model_resolver, evaluator]
    if not with_quantizer:
        return _pipeline(pipeline_name, pipeline_root, components, enable_cache, metadata_path, beam_pipeline_args)

    previous_report = None
    if resume_from_previous_report:
        report_resolver = tfx.dsl.Resolver(
            strategy_class=LatestQuantizationReportStrategy,
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
        tuning_strategy=tuning_strategy,
        max_trials=max_trials,
        timeout=timeout,
        calibration_split=calibration_split,
        evaluation_split=evaluation_split,
        sample_size=sample_size,
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
    return _pipeline(pipeline_name, pipeline_root, components, enable_cache, metadata_path, beam_pipeline_args)


def _pipeline(name, root, components, enable_cache, metadata_path, beam_pipeline_args) -> tfx.dsl.Pipeline:
    return tfx.dsl.Pipeline(
        pipeline_name=name,
        pipeline_root=root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path
        ),
        beam_pipeline_args=list(beam_pipeline_args or []),
    )
