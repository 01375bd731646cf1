"""The digits pipeline on other orchestrators, compiled (no cluster needed).

* Kubeflow Pipelines v2: the runner writes the pipeline JSON; every component is a task and
  the Quantizer's executor is ``components.quantizer.executor.Executor`` in the given image.
* Airflow: the DAG builds with every component (resolvers included) as a task, wired in the
  pipeline's order. Built in a subprocess: importing Airflow configures process-wide logging and
  its own home directory, which must not leak into the rest of the test session.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ["CsvExampleGen", "StatisticsGen", "SchemaGen", "Transform", "Trainer", "Evaluator", "Quantizer", "Pusher"]
RESOLVERS = ["latest_blessed_model_resolver", "latest_quantization_report_resolver"]
IMAGE = "local/nano-tfx:test"
QUANTIZER_EXECUTOR = "components.quantizer.executor.Executor"
# KFP v2's rule for custom artifact type names (tfx/orchestration/kubeflow/v2/compiler_utils.py).
KFP_TYPE_NAME = re.compile(r"^[a-z][a-z0-9-_]{2,20}[.][A-Z][a-zA-Z0-9-_]{2,49}$")


def _report_type_name() -> str:
    from components import QuantizationReport

    return QuantizationReport.TYPE_NAME


@pytest.fixture(scope="module")
def kfp_json(tmp_path_factory):
    if not KFP_TYPE_NAME.fullmatch(_report_type_name()):
        pytest.xfail(
            f"QuantizationReport.TYPE_NAME {_report_type_name()!r} is not a valid KFP v2 schema title "
            "('namespace.TypeName', e.g. 'nano_tfx.QuantizationReport'): KubeflowV2DagRunner refuses it"
        )
    from pipelines.digits.kubeflow_v2_runner import compile_pipeline

    path = str(tmp_path_factory.mktemp("kfp") / "digits.json")
    job = compile_pipeline(path, image=IMAGE, pipeline_root="gs://bucket/tfx/digits", train_steps=7, max_trials=2)
    with open(path) as f:
        assert json.load(f) == job  # written to disk as returned
    return job


def test_kfp_json_has_every_component_as_a_task(kfp_json):
    spec = kfp_json["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(COMPONENTS) <= set(tasks)
    assert set(tasks["Pusher"]["dependentTasks"]) == {"Quantizer"}
    assert {"Evaluator", "Trainer", "Transform"} <= set(tasks["Quantizer"]["dependentTasks"])
    assert spec["pipelineInfo"]["name"] == "digits-int8"


def test_kfp_quantizer_runs_its_executor_in_the_image(kfp_json):
    executors = kfp_json["pipelineSpec"]["deploymentSpec"]["executors"]
    container = executors["Quantizer_executor"]["container"]
    assert container["image"] == IMAGE
    assert container["command"][-1] == "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"
    args = container["args"]
    assert args[args.index("--executor_class_path") + 1] == QUANTIZER_EXECUTOR
    assert "--direct_running_mode=multi_processing" in args
    for name in ("Trainer", "Transform", "Evaluator", "Pusher"):  # same image everywhere
        assert executors[f"{name}_executor"]["container"]["image"] == IMAGE
    # the Quantizer's knobs travel as pipeline parameters
    params = kfp_json["pipelineSpec"]["components"]["Quantizer"]["inputDefinitions"]["parameters"]
    assert {"precision", "sample_size", "signature_name", "max_trials"} <= set(params)
    text = json.dumps(kfp_json)
    assert "pipelines.digits.digits_utils.run_fn" in text and "/app/pipelines/digits/data" in text


AIRFLOW_SCRIPT = textwrap.dedent("""
    import json
    from pipelines.digits.airflow_dag import DAG, create_dag
    from airflow.models import DAG as AirflowDAG
    custom = create_dag(root=ROOT, train_steps=7, max_trials=2)
    print("RESULT " + json.dumps({
        "is_dag": isinstance(DAG, AirflowDAG) and isinstance(custom, AirflowDAG),
        "dag_id": custom.dag_id,
        "schedule": str(custom.schedule_interval),
        "tasks": {t.task_id: sorted(t.upstream_task_ids) for t in custom.tasks},
        "operators": sorted({type(t).__name__ for t in custom.tasks}),
    }))
""")


def test_airflow_dag_has_every_component_as_a_task(tmp_path):
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               NANO_TFX_AIRFLOW_ROOT=str(tmp_path / "default_root"))
    script = "ROOT = %r\n" % str(tmp_path / "root") + AIRFLOW_SCRIPT
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    dag = json.loads(lines[-1][len("RESULT "):])
    assert dag["is_dag"] and dag["dag_id"] == "digits_int8" and dag["schedule"] == "None"
    assert set(dag["tasks"]) == set(COMPONENTS + RESOLVERS)
    assert dag["operators"] == ["AirflowComponent"]
    up = dag["tasks"]
    assert up["Pusher"] == ["Quantizer"]
    assert {"Evaluator", "Trainer", "Transform", "latest_quantization_report_resolver"} <= set(up["Quantizer"])
    assert {"Trainer", "latest_blessed_model_resolver"} <= set(up["Evaluator"])
    assert up["StatisticsGen"] == ["CsvExampleGen"]
