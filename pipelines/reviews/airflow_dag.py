"""The reviews pipeline as an Airflow DAG (TFX's AirflowDagRunner): one task per component.

Put this file (or a one-line import of ``DAG`` from it) in Airflow's ``dags/`` folder with this
repository importable (``pip install -e .`` into Airflow's environment); the DAG id is
``reviews_int8``, unscheduled (trigger it by hand or with ``airflow dags trigger reviews_int8``).
Outputs go under ``$NANO_TFX_AIRFLOW_ROOT`` (default ``~/airflow/tfx/reviews_int8``):
``pipeline_root/``, ``metadata.sqlite`` and ``serving_model/``.
"""
import nano_tfx  # noqa: F401  (first: oneDNN must be on before TensorFlow is imported)

from pipelines.reviews import ENTRY

#: create_dag(root=None, airflow_dag_config=None, beam_pipeline_args=None, **create_pipeline_kwargs)
create_dag = ENTRY.airflow_dag

# What Airflow's DAG processor picks up.
DAG = create_dag()
