"""Reviews pipeline: tokenize review text, train a small transformer, quantize it to INT8, push it.

CsvExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher,
on the 100 labelled IMDB reviews that ship with TFX (``tfx/examples/imdb/data``, located at run
time: nothing is copied). Transform lowercases and tokenizes the text and maps tokens to ids with a
tf.Transform vocabulary; the model is a two-block Keras transformer encoder; the pushed INT8 model
still answers raw-text tf.Examples (the transform graph travels with it).

100 reviews (≈67 train / 33 eval) are far too few to learn sentiment: the FP32 model's accuracy is
near chance and moves with every retrain, so the Evaluator's value bar defaults to 0 (a sanity bar;
the no-regression check against the latest blessed model still applies) and the Quantizer's
criterion is what matters: the INT8 model may not lose more than it allows against that FP32
baseline. Point ``data_root`` at a bigger CSV (``label,text``) for a real classifier.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from tfx import v1 as tfx

from pipelines.common import build_pipeline, make_eval_config  # noqa: F401 (re-export)
from pipelines.reviews.features import LABEL_KEY, LABEL_XF

_UTILS = "pipelines.reviews.reviews_utils"


def imdb_data_root() -> str:
    """TFX's bundled IMDB sample: ``imdb_small_with_labels.txt`` (CSV ``label,text``, 100 rows)."""
    import importlib.util

    spec = importlib.util.find_spec("tfx")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data_root: the tfx package is not installed; pass a directory of label,text CSVs")
    root = os.path.join(list(spec.submodule_search_locations)[0], "examples", "imdb", "data")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_root: TFX's IMDB sample is not at {root!r}; pass a directory of label,text CSVs")
    return root


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    serving_model_dir: str,
    metadata_path: Optional[str] = None,
    data_root: Optional[str] = None,
    train_steps: int = 60,
    eval_steps: int = 5,
    hparams: Optional[Mapping[str, Any]] = None,
    accuracy_threshold: float = 0.0,
    change_threshold: Optional[float] = -1e-10,
    accelerator: Optional[str] = "onnxruntime",
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
    """The reviews pipeline; every knob is an argument (runners, the CLI and tests set them).

    Args:
      data_root: a directory of CSV files with a header ``label,text`` (label 0/1), split 2:1
        into train/eval by ExampleGen's hash; default: TFX's bundled IMDB sample.
      train_steps, eval_steps, hparams: Trainer steps and ``reviews_utils.make_model`` kwargs.
      accuracy_threshold: the Evaluator's value bar (default 0: see the module doc).
      accelerator: the Quantizer's backend; default ONNX Runtime (see README, "Text pipeline":
        its INT8 encoder beats TF FP32 at batch 1 on any x86 CPU, so the speed gate holds).
      The other arguments are those of ``pipelines.digits.pipeline.create_pipeline``.
    """
    example_gen = tfx.components.CsvExampleGen(input_base=data_root or imdb_data_root())
    knobs = {k: v for k, v in locals().items() if k not in ("data_root", "example_gen")}
    return build_pipeline(example_gen=example_gen, module=_UTILS, label_key=LABEL_KEY,
                          transformed_label_key=LABEL_XF, **knobs)
