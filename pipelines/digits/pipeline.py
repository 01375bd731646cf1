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

from tfx import v1 as tfx

from pipelines.common import build_pipeline, make_eval_config  # noqa: F401 (re-export)
from pipelines.digits.features import LABEL_KEY, LABEL_XF

_UTILS = "pipelines.digits.digits_utils"
DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


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
    with_quantizer: bool = True,
    min_speedup: float | None = 1.0,
    fp32_serving_model_dir: str | None = None,
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
      with_quantizer: False stops after the Evaluator (the FP32 pipeline).
      min_speedup: the Quantizer's speed gate (default 1.0: never bless a model slower than FP32).
      fp32_serving_model_dir: also push the FP32 model on the Evaluator's blessing here (the
        fallback when the Quantizer's accuracy or speed gate blocks); default None: off.
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
    knobs = {k: v for k, v in locals().items() if k not in ("data_root", "example_gen")}
    return build_pipeline(example_gen=example_gen, module=_UTILS, label_key=LABEL_KEY,
                          transformed_label_key=LABEL_XF, **knobs)
