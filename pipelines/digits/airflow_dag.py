"""The digits pipeline as an Airflow DAG (TFX's AirflowDagRunner): one task per component.

Put this file (or a one-line import of ``DAG`` from it) in Airflow's ``dags/`` folder with this
repository importable (``pip install -e .`` into Airflow's environment); the DAG id is
``digits_int8``, unscheduled (trigger it by hand or with ``airflow dags trigger digits_int8``).
Outputs go under ``$NANO_TFX_AIRFLOW_ROOT`` (default ``~/airflow/tfx/digits_int8``):
``pipeline_root/``, ``metadata.sqlite`` and ``serving_model/``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional, Sequence

import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

PIPELINE_NAME = "digits_int8"
DEFAULT_ROOT = os.environ.get(
    "NANO_TFX_AIRFLOW_ROOT", os.path.join(os.path.expanduser("~"), "airflow", "tfx", PIPELINE_NAME)
)
AIRFLOW_CONFIG: Dict[str, Any] = {
    "schedule": None,
    "start_date": datetime.datetime(2024, 1, 1),
    "catchup": False,
    "tags": ["nano-tfx", "int8"],
}


def create_dag(
    root: str = DEFAULT_ROOT,
    airflow_dag_config: Optional[Dict[str, Any]] = None,
    beam_pipeline_args: Optional[Sequence[str]] = None,
    **pipeline_kwargs: Any,
):
    """An ``airflow.models.DAG`` of the digits pipeline (``pipeline_kwargs`` → ``create_pipeline``)."""
    from tfx.orchestration.airflow.airflow_dag_runner import AirflowDagRunner, AirflowPipelineConfig

    from pipelines.digits.pipeline import create_pipeline

    pipeline = create_pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=os.path.join(root, "pipeline_root"),
        serving_model_dir=os.path.join(root, "serving_model"),
        metadata_path=os.path.join(root, "metadata.sqlite"),
        beam_pipeline_args=list(beam_pipeline_args) if beam_pipeline_args is not None
        else ["--direct_running_mode=multi_processing", "--direct_num_workers=0"],
        **pipeline_kwargs,
    )
    config = AirflowPipelineConfig(airflow_dag_config=dict(AIRFLOW_CONFIG, **(airflow_dag_config or {})))
    return AirflowDagRunner(config).run(pipeline)


# What Airflow's DAG processor picks up.
DAG = create_dag()
