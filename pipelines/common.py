"""The part every nano-tfx pipeline shares: Trainer → Evaluator → Quantizer → Pusher wiring.

A pipeline package (``pipelines.digits``, ``pipelines.penguin``, ``pipelines.reviews``) brings its
ExampleGen, its Transform/Trainer module and its defaults, and calls ``build_pipeline``::

    ExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher

The Evaluator blesses the FP32 model (value bar on the overall slice, and no regression vs. the
latest blessed model); the Quantizer only quantizes a blessed model and blesses the INT8 model
only when it meets ``accuracy_criterion`` *and* the Evaluator's bar; the Pusher pushes the
*quantized* model, only when the Quantizer blessed it. The Quantizer also refuses (by default)
a model slower than the FP32 one (``min_speedup``); with ``fp32_serving_model_dir`` a second
Pusher pushes the FP32 model on the Evaluator's blessing, so a blocked INT8 model still leaves a
servable model (see README, "When the speed gate blocks").
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx

from components import LatestQuantizationReportStrategy, QuantizationReport, Quantizer

def make_eval_config(
    label_key: str,
    accuracy_threshold: float,
    change_threshold: Optional[float] = -1e-10,
) -> tfma.EvalConfig:
    """TFMA config over raw examples (``serving_default``): accuracy bar on the overall slice,
    plus (unless ``change_threshold`` is None) no drop vs. the latest blessed model."""
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


def build_pipeline(
    *,
    pipeline_name: str,
    pipeline_root: str,
    serving_model_dir: str,
    metadata_path: Optional[str],
    example_gen: Any,
    module: str,
    label_key: str,
    transformed_label_key: str,
    train_steps: int,
    eval_steps: int,
    hparams: Optional[Mapping[str, Any]],
    accuracy_threshold: float,
    change_threshold: Optional[float],
    quantizer_batch_size: Optional[int] = None,
    resume_from_previous_report: bool = True,
    previous_report_strategy: Optional[type] = None,
    quantizer_beam_pipeline_args: Optional[Sequence[str]] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    enable_cache: bool = True,
    with_quantizer: bool = True,
    fp32_serving_model_dir: Optional[str] = None,
    **quantizer_params: Any,
) -> tfx.dsl.Pipeline:
    """The shared pipeline body (see the module docstring).

    ``module`` is the import path of the Transform/Trainer module (``preprocessing_fn`` and
    ``run_fn``); referenced by import path, no module-file wheel is built, and the same module
    works locally, on Airflow and in the KFP container image. ``quantizer_params`` go to the
    ``Quantizer`` as they are (its constructor validates them). ``previous_report_strategy`` defaults to
    ``LatestQuantizationReportStrategy`` (newest report with trials; nothing on a first run);
    Kubeflow v2 compiles only TFX's built-in strategies, so its runners pass
    ``tfx.dsl.experimental.LatestArtifactStrategy``. ``metadata_path`` is None for orchestrators
    with their own metadata store (Kubeflow). ``with_quantizer=False`` stops after the Evaluator.
    ``fp32_serving_model_dir`` (default None: off) adds a Pusher of the FP32 model on the
    Evaluator's blessing to that directory: the fallback when the Quantizer does not bless.
    """
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(
        statistics=statistics_gen.outputs["statistics"], infer_feature_shape=True
    )
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=f"{module}.preprocessing_fn",
    )
    trainer = tfx.components.Trainer(
        run_fn=f"{module}.run_fn",
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
        eval_config=make_eval_config(label_key, accuracy_threshold, change_threshold),
    )
    components = [example_gen, statistics_gen, schema_gen, transform, trainer, model_resolver, evaluator]
    if fp32_serving_model_dir:
        components.append(tfx.components.Pusher(
            model=trainer.outputs["model"],
            model_blessing=evaluator.outputs["blessing"],
            push_destination=tfx.proto.PushDestination(
                filesystem=tfx.proto.PushDestination.Filesystem(base_directory=fp32_serving_model_dir)
            ),
        ).with_id("fp32_pusher"))

    if with_quantizer:
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
            raw_examples=example_gen.outputs["examples"],  # auto: finalists timed as served
            label_key=transformed_label_key,
            batch_size=quantizer_batch_size,
            **quantizer_params,
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
