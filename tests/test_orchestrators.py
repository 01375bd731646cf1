"""The digits, penguin and reviews pipelines on other orchestrators, compiled (no cluster needed).

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
PIPELINES = {  # package: (ExampleGen, KFP name, Airflow DAG id, image data root)
    "digits": ("CsvExampleGen", "digits-int8", "digits_int8", "/app/pipelines/digits/data"),
    "penguin": ("ImportExampleGen", "penguin-int8", "penguin_int8", "/app/data/penguin"),
    "reviews": ("CsvExampleGen", "reviews-int8", "reviews_int8", "/app/data/reviews"),
}
COMPONENTS = ["StatisticsGen", "SchemaGen", "Transform", "Trainer", "Evaluator", "Quantizer", "Pusher"]
RESOLVERS = ["latest_blessed_model_resolver", "latest_quantization_report_resolver"]
IMAGE = "local/nano-tfx:test"
QUANTIZER_EXECUTOR = "components.quantizer.executor.Executor"
# KFP v2's rule for custom artifact type names (tfx/orchestration/kubeflow/v2/compiler_utils.py).
KFP_TYPE_NAME = re.compile(r"^[a-z][a-z0-9-_]{2,20}[.][A-Z][a-zA-Z0-9-_]{2,49}$")


def test_report_type_name_is_a_valid_kfp_schema_title():
    from components import QuantizationReport

    assert KFP_TYPE_NAME.fullmatch(QuantizationReport.TYPE_NAME), QuantizationReport.TYPE_NAME


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def kfp_json(request, tmp_path_factory):
    import importlib

    package = request.param
    runner = importlib.import_module(f"pipelines.{package}.kubeflow_v2_runner")
    path = str(tmp_path_factory.mktemp("kfp") / f"{package}.json")
    job = runner.compile_pipeline(path, image=IMAGE, pipeline_root=f"gs://bucket/tfx/{package}",
                                  train_steps=7, max_trials=2)
    with open(path) as f:
        assert json.load(f) == job  # written to disk as returned
    return package, job


def test_kfp_json_has_every_component_as_a_task(kfp_json):
    package, job = kfp_json
    example_gen, kfp_name, _, _ = PIPELINES[package]
    spec = job["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set([example_gen] + COMPONENTS) <= set(tasks)
    assert set(tasks["Pusher"]["dependentTasks"]) == {"Quantizer"}
    assert {"Evaluator", "Trainer", "Transform"} <= set(tasks["Quantizer"]["dependentTasks"])
    assert spec["pipelineInfo"]["name"] == kfp_name
    # the previous report is resolved with a strategy KFP compiles (LatestArtifactStrategy)
    assert "latest_quantization_report_resolver" in json.dumps(spec)


def test_kfp_quantizer_runs_its_executor_in_the_image(kfp_json):
    package, job = kfp_json
    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    container = executors["Quantizer_executor"]["container"]
    assert container["image"] == IMAGE
    assert container["command"][-1] == "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"
    args = container["args"]
    assert args[args.index("--executor_class_path") + 1] == QUANTIZER_EXECUTOR
    assert "--direct_running_mode=multi_processing" in args
    for name in ("Trainer", "Transform", "Evaluator", "Pusher"):  # same image everywhere
        assert executors[f"{name}_executor"]["container"]["image"] == IMAGE
    # the Quantizer's knobs travel as pipeline parameters
    params = job["pipelineSpec"]["components"]["Quantizer"]["inputDefinitions"]["parameters"]
    assert {"precision", "sample_size", "signature_name", "max_trials"} <= set(params)
    text = json.dumps(job)
    assert f"pipelines.{package}.{package}_utils.run_fn" in text and PIPELINES[package][3] in text


AIRFLOW_SCRIPT = textwrap.dedent("""
    import json
    from pipelines.PACKAGE.airflow_dag import DAG, create_dag
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


# Every package goes through the one runner (pipelines/runners.py): one DAG in the default run.
@pytest.mark.parametrize("package", [p if p == "digits" else pytest.param(p, marks=pytest.mark.extended)
                                     for p in sorted(PIPELINES)])
def test_airflow_dag_has_every_component_as_a_task(package, tmp_path):
    example_gen, _, dag_id, _ = PIPELINES[package]
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               NANO_TFX_AIRFLOW_ROOT=str(tmp_path / "default_root"))
    script = "ROOT = %r\n" % str(tmp_path / "root") + AIRFLOW_SCRIPT.replace("PACKAGE", package)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    dag = json.loads(lines[-1][len("RESULT "):])
    assert dag["is_dag"] and dag["dag_id"] == dag_id and dag["schedule"] == "None"
    assert set(dag["tasks"]) == set([example_gen] + COMPONENTS + RESOLVERS)
    assert dag["operators"] == ["AirflowComponent"]
    up = dag["tasks"]
    assert up["Pusher"] == ["Quantizer"]
    assert {"Evaluator", "Trainer", "Transform", "latest_quantization_report_resolver"} <= set(up["Quantizer"])
    assert {"Trainer", "latest_blessed_model_resolver"} <= set(up["Evaluator"])
    assert up["StatisticsGen"] == [example_gen]


def test_kfp_reviews_quantizes_with_its_default_backend(kfp_json):
    """The reviews pipeline's Quantizer defaults to ONNX Runtime (its INT8 encoder clears the speed
    gate on any x86 CPU); digits and penguin keep INC, the Quantizer's own default."""
    package, job = kfp_json
    params = job["pipelineSpec"]["root"]["dag"]["tasks"]["Quantizer"]["inputs"]["parameters"]
    accelerator = params.get("accelerator", {}).get("runtimeValue", {}).get("constantValue", {}).get("stringValue")
    assert accelerator == ("onnxruntime" if package == "reviews" else None), params.get("accelerator")
