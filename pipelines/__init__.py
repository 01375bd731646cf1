"""Ready TFX pipelines that end in Quantizer → Pusher (``pipelines.digits``, ``pipelines.penguin``,
``pipelines.reviews``: text).

Each has ``pipeline.py`` (``create_pipeline``), its Transform/Trainer module and three runners:
``local_runner.py`` (LocalDagRunner), ``kubeflow_v2_runner.py`` (KFP v2 pipeline JSON) and
``airflow_dag.py`` (an Airflow DAG). The helpers below read a finished local run back from its
ML Metadata store (no TFX import at package import time).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional


def _store(metadata_path: str):
    """A read-only MLMD store on a local run's SQLite file (no TFX import)."""
    import os

    import ml_metadata as mlmd
    from ml_metadata.proto import metadata_store_pb2

    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(f"metadata_path: {metadata_path!r} does not exist")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(config)


def _latest_run(store, pipeline_name: Optional[str] = None):
    runs = store.get_contexts_by_type("pipeline_run")
    if pipeline_name:
        pipelines = {c.id for c in store.get_contexts_by_type("pipeline") if c.name == pipeline_name}
        if pipelines:
            runs = [r for r in runs if any(p.id in pipelines for p in store.get_parent_contexts_by_context(r.id))] or runs
    return max(runs, key=lambda c: (c.create_time_since_epoch, c.id)) if runs else None


def _node_id(store, execution) -> str:
    for ctx in store.get_contexts_by_execution(execution.id):
        if ctx.type == "node":
            return ctx.name.split(".", 1)[-1]
    return execution.type.split(".")[-1]


def _properties(artifact) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in artifact.custom_properties.items():
        kind = value.WhichOneof("value")
        out[key] = getattr(value, kind) if kind in ("int_value", "double_value", "string_value") else str(value)
    return out


def run_outputs(metadata_path: str, pipeline_name: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """The latest run of a local pipeline, per node id::

        {"Trainer": {"state": "COMPLETE", "seconds": 31.2,
                     "outputs": {"model": [{"uri": ..., "properties": {...}}]}}, ...}

    ``state`` is MLMD's last known state (``CACHED`` for a reused result); ``seconds`` is the wall
    time from the execution's registration to its last update.
    """
    from ml_metadata.proto import metadata_store_pb2

    store = _store(metadata_path)
    run = _latest_run(store, pipeline_name)
    if run is None:
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    executions = sorted(store.get_executions_by_context(run.id), key=lambda e: (e.create_time_since_epoch, e.id))
    for ex in executions:
        state = metadata_store_pb2.Execution.State.Name(ex.last_known_state)
        outputs: Dict[str, List[Dict[str, Any]]] = {}
        events = [e for e in store.get_events_by_execution_ids([ex.id])
                  if e.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])} if events else {}
        for ev in events:
            key = ev.path.steps[0].key if ev.path.steps else ""
            art = artifacts.get(ev.artifact_id)
            if art is not None:
                outputs.setdefault(key, []).append({"uri": art.uri, "properties": _properties(art)})
        out[_node_id(store, ex)] = {
            "state": state,
            "seconds": (ex.last_update_time_since_epoch - ex.create_time_since_epoch) / 1000.0,
            "outputs": outputs,
        }
    return out


def component_timings(metadata_path: str, pipeline_name: Optional[str] = None) -> Dict[str, float]:
    """{node id: seconds} of the latest run (see ``run_outputs``)."""
    return {node: info["seconds"] for node, info in run_outputs(metadata_path, pipeline_name).items()}
