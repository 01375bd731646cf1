"""Penguin pipeline with INT8 quantization gated by the Evaluator.

ExampleGen → StatisticsGen → SchemaGen → Transform → Trainer → Evaluator → Quantizer → Pusher.
The Pusher pushes the *quantized* model, and only when the Quantizer blessed it (which requires
the Evaluator to have blessed the FP32 model first).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Mapping, Sequence

from tfx import v1 as tfx

from pipelines.common import build_pipeline, make_eval_config  # noqa: F401 (re-export)

_UTILS = "pipelines.penguin.penguin_utils"
LABEL_KEY = "species"  # penguin_utils.LABEL_KEY (not imported: it pulls in TensorFlow)


def penguin_data_root() -> str:
    """TFX's bundled penguin data (TFRecords of tf.Examples, Split-train / Split-eval)."""
    import tfx as tfx_pkg

    return os.path.join(os.path.dirname(tfx_pkg.__file__), "components", "testdata", "penguin", "data")


def _example_gen(data_root: str):
    """CsvExampleGen for a directory of CSVs, ImportExampleGen for TFX's pre-split TFRecords.

    A ``data_root`` this machine can't list (a path inside the KFP image, a bucket) is taken to
    have the bundled layout: ``Split-train/`` and ``Split-eval/`` TFRecords.
    """
    if not os.path.isdir(data_root):
        splits = ["eval", "train"]
    elif glob.glob(os.path.join(data_root, "*.csv")):
        return tfx.components.CsvExampleGen(input_base=data_root)
    else:
        splits = sorted(d[len("Split-"):] for d in os.listdir(data_root) if d.startswith("Split-"))
    if not splits:
        raise ValueError(f"data_root: {data_root!r} has neither *.csv nor Split-* TFRecord directories")
    return tfx.components.ImportExampleGen(
        input_base=data_root,
        input_config=tfx.proto.Input(
            splits=[tfx.proto.Input.Split(name=s, pattern=f"Split-{s}/*") for s in splits]
        ),
    )


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    serving_model_dir: str,
    metadata_path: str | None = None,
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
    quantizer_batch_size: int | None = None,
    signature_name: str = "from_transformed_features",
    resume_from_previous_report: bool = True,
    previous_report_strategy: type | None = None,
    quantizer_beam_pipeline_args: Sequence[str] | None = None,
    beam_pipeline_args: Sequence[str] | None = None,
    enable_cache: bool = True,
    with_quantizer: bool = True,
    min_speedup: float | None = 1.0,
    fp32_serving_model_dir: str | None = None,
) -> tfx.dsl.Pipeline:
    """The penguin pipeline; every knob is an argument (runners and tests set them).

    ``data_root``: TFX's bundled penguin data by default (``Split-*`` TFRecord directories), or a
    directory of CSVs. ``metadata_path``: SQLite MLMD file for local/Airflow runs, None where the
    orchestrator has its own store (Kubeflow). The rest is ``pipelines.common.build_pipeline``:
    ``resume_from_previous_report`` wires the latest ``QuantizationReport`` back into the
    Quantizer so a rerun reuses trials already evaluated for the same model and configuration;
    ``quantizer_beam_pipeline_args`` override the Beam args for the Quantizer only (e.g. to run
    its trials on another Beam runner); ``with_quantizer=False`` stops after the Evaluator.
    """
    knobs = {k: v for k, v in locals().items() if k != "data_root"}
    return build_pipeline(example_gen=_example_gen(data_root or penguin_data_root()), module=_UTILS,
                          label_key=LABEL_KEY, transformed_label_key=LABEL_KEY + "_xf", **knobs)
