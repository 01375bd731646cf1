"""Run the digits pipeline locally: LocalDagRunner + Beam's multi-processing DirectRunner.

    python -m pipelines.digits.local_runner [--root runs/digits_int8] [--accelerator openvino]

Outputs under ``--root``: ``pipeline_root/`` (artifacts), ``metadata.sqlite`` (ML Metadata) and
``serving_model/`` (the Pusher's destination: one numeric version directory per pushed model).
``nano-tfx demo`` is this runner with progress lines.
"""
from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

from pipelines import run_outputs

PIPELINE_NAME = "digits_int8"
DEFAULT_ROOT = os.path.join("runs", PIPELINE_NAME)

#: progress(event, node_id, index, total, seconds): event is "start" or "done"
Progress = Callable[[str, str, int, int, float], None]


def beam_args(num_workers: int = 0, mode: str = "multi_processing") -> list:
    """DirectRunner args: ``multi_processing`` with one worker per CPU by default."""
    return [f"--direct_running_mode={mode}", f"--direct_num_workers={num_workers}"]


class _ComponentProgress(std_logging.Handler):
    """Turns LocalDagRunner's 'Component X is running/finished.' log records into callbacks."""

    def __init__(self, callback: Progress, total: int):
        super().__init__(std_logging.INFO)
        self.callback, self.total, self.index, self.started = callback, total, 0, 0.0

    def emit(self, record: std_logging.LogRecord) -> None:
        if record.msg not in ("Component %s is running.", "Component %s is finished."):
            return
        node_id = str(record.args[0]) if record.args else "?"
        if record.msg.endswith("running."):
            self.index += 1
            self.started = time.time()
            self.callback("start", node_id, self.index, self.total, 0.0)
        else:
            self.callback("done", node_id, self.index, self.total, time.time() - self.started)


def summarize(outputs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Where the pushed model and the report are, and the Quantizer's decision."""
    def first(node: str, key: str) -> Optional[Dict[str, Any]]:
        items = (outputs.get(node) or {}).get("outputs", {}).get(key) or []
        return items[0] if items else None

    pushed = first("Pusher", "pushed_model")
    report = first("Quantizer", "report")
    blessing = first("Quantizer", "blessing")
    quantized = first("Quantizer", "quantized_model")
    props = (pushed or {}).get("properties", {})
    bless = (blessing or {}).get("properties", {})
    return {
        "pushed": bool(props.get("pushed")),
        "pushed_model": props.get("pushed_destination") if props.get("pushed") else None,
        "quantized_model": quantized["uri"] if quantized else None,
        "report_html": os.path.join(report["uri"], "report.html") if report else None,
        "report_json": os.path.join(report["uri"], "report.json") if report else None,
        "blessed": bool(bless.get("blessed")),
        "message": bless.get("blessing_message"),
        "fp32_metric": bless.get("fp32_metric"),
        "int8_metric": bless.get("quantized_metric"),
        "component_seconds": {node: round(info["seconds"], 2) for node, info in outputs.items()},
        "component_states": {node: info["state"] for node, info in outputs.items()},
    }


def run(
    root: str = DEFAULT_ROOT,
    num_workers: int = 0,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    progress: Optional[Progress] = None,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    """Build and run the pipeline under ``root``; return ``summarize`` of the run.

    ``pipeline_kwargs`` go to ``create_pipeline`` (train_steps, accelerator, ...);
    ``beam_pipeline_args`` default to ``beam_args(num_workers)``.
    """
    from absl import logging
    from tfx import v1 as tfx

    from pipelines.digits.pipeline import create_pipeline

    root = os.path.abspath(root)
    metadata_path = os.path.join(root, "metadata.sqlite")
    pipeline = create_pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=os.path.join(root, "pipeline_root"),
        serving_model_dir=os.path.join(root, "serving_model"),
        metadata_path=metadata_path,
        beam_pipeline_args=list(beam_pipeline_args) if beam_pipeline_args is not None else beam_args(num_workers),
        **pipeline_kwargs,
    )
    handler = None
    absl_logger = logging.get_absl_logger()
    old_level = absl_logger.level
    if progress is not None:
        handler = _ComponentProgress(progress, len(pipeline.components))
        absl_logger.addHandler(handler)
        if absl_logger.getEffectiveLevel() > std_logging.INFO:
            absl_logger.setLevel(std_logging.INFO)
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline)
    finally:
        if handler is not None:
            absl_logger.removeHandler(handler)
            absl_logger.setLevel(old_level)
    return summarize(run_outputs(metadata_path, PIPELINE_NAME))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--data_root", default=None, help="default: the bundled digits CSVs")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--accuracy_threshold", type=float, default=0.9)
    parser.add_argument("--accelerator", default=None, choices=[None, "onnxruntime", "openvino", "auto"])
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--accuracy_criterion", type=json.loads, default=None,
                        help='JSON, e.g. \'{"relative": 0.01, "higher_is_better": true}\'')
    parser.add_argument("--max_trials", type=int, default=None)
    parser.add_argument("--sample_size", type=int, default=100)
    parser.add_argument("--num_workers", type=int, default=0, help="Beam DirectRunner workers (0: one per CPU)")
    args = parser.parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.INFO)
    kwargs: Dict[str, Any] = dict(
        train_steps=args.train_steps, accuracy_threshold=args.accuracy_threshold,
        accelerator=args.accelerator, precision=args.precision,
        accuracy_criterion=args.accuracy_criterion, max_trials=args.max_trials,
        sample_size=args.sample_size,
    )
    if args.data_root:
        kwargs["data_root"] = args.data_root
    summary = run(args.root, num_workers=args.num_workers, **kwargs)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
