"""Runners shared by every pipeline package: local (LocalDagRunner), Kubeflow Pipelines v2, Airflow.

Each pipeline package has three thin entry points over these functions — ``local_runner.py``,
``kubeflow_v2_runner.py`` and ``airflow_dag.py`` — that only name the pipeline and its defaults.
A runner takes the package's ``create_pipeline`` and passes ``**pipeline_kwargs`` through to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging as std_logging
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

from pipelines import run_outputs

#: progress(event, node_id, index, total, seconds): event is "start" or "done"
Progress = Callable[[str, str, int, int, float], None]
CreatePipeline = Callable[..., Any]
ACCELERATOR_CHOICES = [None, "inc", "onnxruntime", "openvino", "auto"]


def _accelerator(name: Optional[str]) -> Optional[str]:
    """The command line's ``--accelerator`` as the Quantizer takes it (``inc`` is ``None``)."""
    return None if name in (None, "inc") else name


def _add_accelerator_argument(parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> None:
    default = defaults.get("accelerator")
    parser.add_argument("--accelerator", default=default, choices=ACCELERATOR_CHOICES,
                        help=f"the Quantizer's backend (default: {default or 'inc'}; inc = Intel Neural Compressor)")


def beam_args(num_workers: int = 0, mode: str = "multi_processing") -> list:
    """DirectRunner args: ``multi_processing`` with one worker per CPU (0) by default."""
    return [f"--direct_running_mode={mode}", f"--direct_num_workers={num_workers}"]


# -- local ------------------------------------------------------------------------------------
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


def run_local(
    create_pipeline: CreatePipeline,
    pipeline_name: str,
    root: str,
    num_workers: int = 0,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    progress: Optional[Progress] = None,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    """Build the pipeline under ``root`` and run it with LocalDagRunner; return ``summarize``.

    Layout under ``root``: ``pipeline_root/`` (artifacts), ``metadata.sqlite`` (ML Metadata) and
    ``serving_model/`` (the Pusher's destination: one numeric version directory per push).
    ``beam_pipeline_args`` default to ``beam_args(num_workers)`` (multi-processing DirectRunner).
    """
    from absl import logging
    from tfx import v1 as tfx

    root = os.path.abspath(root)
    metadata_path = os.path.join(root, "metadata.sqlite")
    pipeline = create_pipeline(
        pipeline_name=pipeline_name,
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
    return summarize(run_outputs(metadata_path, pipeline_name))


def local_main(
    create_pipeline: CreatePipeline,
    pipeline_name: str,
    description: str,
    defaults: Dict[str, Any],
    argv: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Command line of a package's ``local_runner``: parse, run, print the summary as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=os.path.join("runs", pipeline_name))
    parser.add_argument("--data_root", default=None, help="default: the pipeline's bundled data")
    parser.add_argument("--train_steps", type=int, default=defaults["train_steps"])
    parser.add_argument("--accuracy_threshold", type=float, default=defaults["accuracy_threshold"])
    _add_accelerator_argument(parser, defaults)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--accuracy_criterion", type=json.loads, default=None,
                        help='JSON, e.g. \'{"relative": 0.01, "higher_is_better": true}\'')
    parser.add_argument("--tuning_strategy", default=None)
    parser.add_argument("--max_trials", type=int, default=None)
    parser.add_argument("--sample_size", type=int, default=100)
    parser.add_argument("--num_workers", type=int, default=0, help="Beam DirectRunner workers (0: one per CPU)")
    args = parser.parse_args(argv)

    from absl import logging

    logging.set_verbosity(logging.INFO)
    kwargs: Dict[str, Any] = dict(
        train_steps=args.train_steps, accuracy_threshold=args.accuracy_threshold,
        accelerator=_accelerator(args.accelerator), precision=args.precision,
        accuracy_criterion=args.accuracy_criterion, tuning_strategy=args.tuning_strategy,
        max_trials=args.max_trials, sample_size=args.sample_size,
    )
    if args.data_root:
        kwargs["data_root"] = args.data_root
    summary = run_local(create_pipeline, pipeline_name, args.root, num_workers=args.num_workers, **kwargs)
    print(json.dumps(summary, indent=2))
    return summary


# -- Kubeflow Pipelines v2 --------------------------------------------------------------------
def compile_kubeflow_v2(
    create_pipeline: CreatePipeline,
    pipeline_name: str,
    output_path: str,
    image: str,
    pipeline_root: str,
    data_root: Optional[str] = None,
    serving_model_dir: Optional[str] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    """Write the KFP v2 pipeline JSON (a ``PipelineJob``) to ``output_path``; return it as a dict.

    Every step, the Quantizer included, runs in ``image`` (built from ``components/Dockerfile``).
    The metadata store is KFP's own (no ``metadata_path``); the previous report is resolved with
    ``LatestArtifactStrategy`` (KFP v2 compiles no custom resolver strategy).
    """
    from tfx import v1 as tfx

    pipeline_kwargs.setdefault("previous_report_strategy", tfx.dsl.experimental.LatestArtifactStrategy)
    if data_root is not None:
        pipeline_kwargs["data_root"] = data_root
    pipeline = create_pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        serving_model_dir=serving_model_dir or pipeline_root.rstrip("/") + "/serving_model",
        metadata_path=None,
        beam_pipeline_args=list(beam_pipeline_args) if beam_pipeline_args is not None else beam_args(0),
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


def kubeflow_v2_main(
    create_pipeline: CreatePipeline,
    pipeline_name: str,
    description: str,
    default_data_root: str,
    defaults: Dict[str, Any],
    argv: Optional[Sequence[str]] = None,
) -> str:
    """Command line of a package's ``kubeflow_v2_runner``; prints the JSON's path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--image", default=os.environ.get("NANO_TFX_IMAGE", "nano-tfx:0.1.0"))
    parser.add_argument("--pipeline_root", default=os.environ.get(
        "NANO_TFX_PIPELINE_ROOT", "gs://YOUR_BUCKET/tfx/" + pipeline_name))
    parser.add_argument("--data_root", default=default_data_root)
    parser.add_argument("--output", default=pipeline_name + "_pipeline.json")
    parser.add_argument("--train_steps", type=int, default=defaults["train_steps"])
    _add_accelerator_argument(parser, defaults)
    parser.add_argument("--max_trials", type=int, default=None)
    args = parser.parse_args(argv)
    compile_kubeflow_v2(create_pipeline, pipeline_name, args.output, image=args.image,
                        pipeline_root=args.pipeline_root, data_root=args.data_root,
                        train_steps=args.train_steps, accelerator=_accelerator(args.accelerator),
                        max_trials=args.max_trials)
    print(os.path.abspath(args.output))
    return args.output


# -- Airflow ----------------------------------------------------------------------------------
AIRFLOW_CONFIG: Dict[str, Any] = {
    "schedule": None,
    "start_date": datetime.datetime(2024, 1, 1),
    "catchup": False,
    "tags": ["nano-tfx", "int8"],
}


def airflow_root(pipeline_name: str) -> str:
    """``$NANO_TFX_AIRFLOW_ROOT`` or ``~/airflow/tfx/<pipeline_name>``."""
    return os.environ.get(
        "NANO_TFX_AIRFLOW_ROOT", os.path.join(os.path.expanduser("~"), "airflow", "tfx", pipeline_name)
    )


def airflow_dag(
    create_pipeline: CreatePipeline,
    pipeline_name: str,
    root: str,
    airflow_dag_config: Optional[Dict[str, Any]] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    **pipeline_kwargs: Any,
):
    """An ``airflow.models.DAG`` (TFX's AirflowDagRunner: one task per component, resolvers too).

    Outputs under ``root``: ``pipeline_root/``, ``metadata.sqlite`` and ``serving_model/``.
    """
    from tfx.orchestration.airflow.airflow_dag_runner import AirflowDagRunner, AirflowPipelineConfig

    pipeline = create_pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=os.path.join(root, "pipeline_root"),
        serving_model_dir=os.path.join(root, "serving_model"),
        metadata_path=os.path.join(root, "metadata.sqlite"),
        beam_pipeline_args=list(beam_pipeline_args) if beam_pipeline_args is not None else beam_args(0),
        **pipeline_kwargs,
    )
    config = AirflowPipelineConfig(airflow_dag_config=dict(AIRFLOW_CONFIG, **(airflow_dag_config or {})))
    return AirflowDagRunner(config).run(pipeline)


# -- one pipeline package's entry points ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineEntry:
    """What a pipeline package's runner files need: its names, defaults and ``create_pipeline``.

    Attributes:
      name: pipeline name for local and Airflow runs (also the DAG id).
      kfp_name: pipeline name on Kubeflow (lowercase letters, digits and dashes).
      pipeline_module: import path of the module defining ``create_pipeline`` (imported lazily:
        it pulls in TFX).
      image_data_root: the bundled data inside the ``components/Dockerfile`` image.
      defaults: ``train_steps`` and ``accuracy_threshold`` of the command lines, and their
        ``accelerator`` (None: INC) where the pipeline's own default is another backend.
    """

    name: str
    kfp_name: str
    pipeline_module: str
    image_data_root: str
    defaults: Dict[str, Any]

    @property
    def default_root(self) -> str:
        return os.path.join("runs", self.name)

    def create_pipeline(self, **kwargs: Any):
        import importlib

        return importlib.import_module(self.pipeline_module).create_pipeline(**kwargs)

    def run(self, root: Optional[str] = None, num_workers: int = 0,
            beam_pipeline_args: Optional[Sequence[str]] = None, progress: Optional[Progress] = None,
            **pipeline_kwargs: Any) -> Dict[str, Any]:
        """``run_local`` of this pipeline (default root ``runs/<name>``)."""
        return run_local(self.create_pipeline, self.name, root or self.default_root, num_workers,
                         beam_pipeline_args, progress, **pipeline_kwargs)

    def local_main(self, description: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        return local_main(self.create_pipeline, self.name, description, self.defaults, argv)

    def compile_kubeflow_v2(self, output_path: str, image: str = "nano-tfx:0.1.0",
                            pipeline_root: Optional[str] = None, data_root: Optional[str] = None,
                            **pipeline_kwargs: Any) -> Dict[str, Any]:
        """``compile_kubeflow_v2`` of this pipeline; data from the image unless ``data_root``."""
        return compile_kubeflow_v2(
            self.create_pipeline, self.kfp_name, output_path, image,
            pipeline_root or "gs://YOUR_BUCKET/tfx/" + self.kfp_name,
            data_root=data_root or self.image_data_root, **pipeline_kwargs)

    def kubeflow_v2_main(self, description: str, argv: Optional[Sequence[str]] = None) -> str:
        return kubeflow_v2_main(self.create_pipeline, self.kfp_name, description, self.image_data_root,
                                self.defaults, argv)

    def airflow_dag(self, root: Optional[str] = None, airflow_dag_config: Optional[Dict[str, Any]] = None,
                    beam_pipeline_args: Optional[Sequence[str]] = None, **pipeline_kwargs: Any):
        """``airflow_dag`` of this pipeline (root: ``$NANO_TFX_AIRFLOW_ROOT`` or ``~/airflow/tfx/<name>``)."""
        return airflow_dag(self.create_pipeline, self.name, root or airflow_root(self.name),
                           airflow_dag_config, beam_pipeline_args, **pipeline_kwargs)
