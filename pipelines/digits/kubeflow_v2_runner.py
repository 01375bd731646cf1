"""Compile the digits pipeline for Kubeflow Pipelines v2 (or Vertex AI Pipelines).

    python -m pipelines.digits.kubeflow_v2_runner \
        --image REGISTRY/nano-tfx:0.1.0 --pipeline_root gs://BUCKET/tfx/digits_int8 \
        --output digits_int8_pipeline.json

writes the KFP v2 pipeline JSON (a ``PipelineJob``; upload it with the KFP client or Vertex AI).
Every step, the Quantizer included, runs in the image built from ``components/Dockerfile``
(TFX + nano-tfx + this repository's ``components``/``pipelines`` packages)::

    docker build -f components/Dockerfile -t REGISTRY/nano-tfx:0.1.0 . && docker push REGISTRY/nano-tfx:0.1.0

The bundled data is in the image (``IMAGE_DATA_ROOT``); pass ``--data_root gs://...`` for your own
``train/*.csv`` + ``eval/*.csv``. Defaults come from the environment: ``NANO_TFX_IMAGE``,
``NANO_TFX_PIPELINE_ROOT``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional, Sequence

import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

PIPELINE_NAME = "digits-int8"  # KFP names: lowercase letters, digits and dashes
DEFAULT_IMAGE = os.environ.get("NANO_TFX_IMAGE", "nano-tfx:0.1.0")
DEFAULT_PIPELINE_ROOT = os.environ.get("NANO_TFX_PIPELINE_ROOT", "gs://YOUR_BUCKET/tfx/" + PIPELINE_NAME)
#: where ``components/Dockerfile`` puts the repository (and so the bundled CSVs)
IMAGE_DATA_ROOT = "/app/pipelines/digits/data"


def compile_pipeline(
    output_path: str,
    image: str = DEFAULT_IMAGE,
    pipeline_root: str = DEFAULT_PIPELINE_ROOT,
    data_root: str = IMAGE_DATA_ROOT,
    serving_model_dir: Optional[str] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    """Write the KFP v2 pipeline JSON to ``output_path`` and return it as a dict.

    ``pipeline_kwargs`` go to ``create_pipeline`` (train_steps, accelerator, max_trials, ...).
    The metadata store is KFP's own (no ``metadata_path``); the previous report is resolved with
    ``LatestArtifactStrategy`` (KFP v2 compiles no custom resolver strategy).
    """
    from tfx import v1 as tfx

    from pipelines.digits.pipeline import create_pipeline

    pipeline_kwargs.setdefault("previous_report_strategy", tfx.dsl.experimental.LatestArtifactStrategy)
    pipeline = create_pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=pipeline_root,
        serving_model_dir=serving_model_dir or pipeline_root.rstrip("/") + "/serving_model",
        metadata_path=None,
        data_root=data_root,
        beam_pipeline_args=list(beam_pipeline_args) if beam_pipeline_args is not None
        else ["--direct_running_mode=multi_processing", "--direct_num_workers=0"],
        **pipeline_kwargs,
    )
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=os.path.dirname(os.path.abspath(output_path)),
        output_filename=os.path.basename(output_path),
    )
    runner.run(pipeline, write_out=True)
    with open(output_path) as f:
        return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--pipeline_root", default=DEFAULT_PIPELINE_ROOT)
    parser.add_argument("--data_root", default=IMAGE_DATA_ROOT)
    parser.add_argument("--output", default=PIPELINE_NAME + "_pipeline.json")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--accelerator", default=None, choices=[None, "onnxruntime", "openvino", "auto"])
    parser.add_argument("--max_trials", type=int, default=None)
    args = parser.parse_args(argv)
    compile_pipeline(args.output, image=args.image, pipeline_root=args.pipeline_root, data_root=args.data_root,
                     train_steps=args.train_steps, accelerator=args.accelerator, max_trials=args.max_trials)
    print(os.path.abspath(args.output))
    return args.output


if __name__ == "__main__":
    main()
