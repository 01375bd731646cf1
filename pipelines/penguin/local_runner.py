"""Run the penguin pipeline locally: LocalDagRunner + Beam's multi-processing DirectRunner.

    python -m pipelines.penguin.local_runner --root /tmp/penguin [--accelerator openvino]

Outputs: <root>/pipeline_root (artifacts), <root>/metadata.sqlite (MLMD), <root>/serving_model
(the Pusher's destination: one numeric version directory per pushed model).
"""
from __future__ import annotations

import argparse
import json
import os

import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)
from absl import logging
from tfx import v1 as tfx

from pipelines.penguin.pipeline import create_pipeline
from pipelines.penguin.timings import component_timings

PIPELINE_NAME = "penguin_int8"


def beam_args(num_workers: int = 0) -> list[str]:
    """Multi-processing DirectRunner (0 workers = one per CPU)."""
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={num_workers}"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(os.getcwd(), "runs", PIPELINE_NAME))
    parser.add_argument("--data_root", default=None, help="default: TFX's bundled penguin data")
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--accelerator", default=None, choices=[None, "onnxruntime", "openvino", "auto"])
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--accuracy_criterion", type=json.loads, default=None,
                        help='JSON, e.g. \'{"relative": 0.01, "higher_is_better": true}\'')
    parser.add_argument("--accuracy_threshold", type=float, default=0.6)
    parser.add_argument("--max_trials", type=int, default=None)
    parser.add_argument("--sample_size", type=int, default=100)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args(argv)

    logging.set_verbosity(logging.INFO)
    root = os.path.abspath(args.root)
    pipeline = create_pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=os.path.join(root, "pipeline_root"),
        serving_model_dir=os.path.join(root, "serving_model"),
        metadata_path=os.path.join(root, "metadata.sqlite"),
        data_root=args.data_root,
        train_steps=args.train_steps,
        accuracy_threshold=args.accuracy_threshold,
        accelerator=args.accelerator,
        precision=args.precision,
        accuracy_criterion=args.accuracy_criterion,
        max_trials=args.max_trials,
        sample_size=args.sample_size,
        beam_pipeline_args=beam_args(args.num_workers),
    )
    tfx.orchestration.LocalDagRunner().run(pipeline)
    timings = component_timings(os.path.join(root, "metadata.sqlite"))
    print(json.dumps({"component_seconds": timings}, indent=2))
    return timings


if __name__ == "__main__":
    main()
