"""Per-component wall-clock times of a LocalDagRunner run, read back from ML Metadata."""
from __future__ import annotations

from typing import Dict


def component_timings(metadata_path: str) -> Dict[str, float]:
    """{node id: seconds} (execution registration → publish) for the latest pipeline run."""
    import ml_metadata as mlmd
    from tfx.orchestration import metadata

    store = mlmd.MetadataStore(metadata.sqlite_metadata_connection_config(metadata_path))
    runs = store.get_contexts_by_type("pipeline_run")
    if not runs:
        return {}
    run = max(runs, key=lambda c: c.create_time_since_epoch)
    out: Dict[str, float] = {}
    for ex in store.get_executions_by_context(run.id):
        node = ex.type.split(".")[-1]
        for ctx in store.get_contexts_by_execution(ex.id):
            if ctx.type == "node":
                node = ctx.name.split(".", 1)[-1]
        out[node] = (ex.last_update_time_since_epoch - ex.create_time_since_epoch) / 1000.0
    return out
