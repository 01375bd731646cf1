"""INT8 coverage in every result (issue 18, item 2): each backend counts the compute ops its
quantized graph runs in INT8, the count travels in the trial record and the report (JSON, table,
HTML, ``nano-tfx report``, the blessing message), and a result with no INT8 op says so plainly.

One real quantization per backend of the digits CNN (2 Conv2D + 2 Dense), 64 calibration rows,
no metric and no timing: a fully quantized trial and one with every compute layer in FP32.
"""
from __future__ import annotations

import argparse
import logging

import pytest

import nano_tfx
from nano_tfx.backends.base import BackendOptions, TrialConfig
from nano_tfx.coverage import coverage_text, op_kind, short_text, tally
from nano_tfx.data import make_batches
from nano_tfx.interchange import to_saved_model
from nano_tfx.report import Report, TrialRecord
from nano_tfx.tuning.runner import TrialJob, _backend_and_prepared, run_trial

FULL = {"MatMul": [2, 2], "Conv": [2, 2]}  # the digits CNN, every compute layer in INT8
NONE = {"MatMul": [0, 2], "Conv": [0, 2]}
ALL_FP32_TEXT = "INT8: 0 of 2 MatMul, 0 of 2 Conv ops (the model runs in FP32)"


def test_engine_op_types_read_as_a_few_kinds():
    matmuls = ["MatMul", "Gemm", "QGemm", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",  # ONNX
               "FullyConnected", "BatchMatMulV2", "Einsum", "_FusedMatMul", "_QuantizedMatMul",  # OV, TF
               "QuantizedMatMulWithBiasAndReluAndRequantize"]
    convs = ["Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "Convolution", "GroupConvolution",
             "Deconvolution", "Conv2D", "DepthwiseConv2dNative", "_FusedConv2D", "_FusedQuantizedConv2D",
             "_QuantizedDepthwiseConv2D"]
    assert {op_kind(t) for t in matmuls} == {"MatMul"}
    assert {op_kind(t) for t in convs} == {"Conv"}
    assert {op_kind(t) for t in ("Attention", "QAttention", "ScaledDotProductAttention")} == {"Attention"}
    for other in ("Convert", "ConvertLike", "FakeQuantize", "DequantizeLinear", "Add", "QuantizedConcatV2", "Relu"):
        assert op_kind(other) is None, other
    counts = tally([("Conv", True), ("MatMul", True), ("Gemm", False), ("Relu", False)])
    assert counts == {"MatMul": [1, 2], "Conv": [1, 1]}
    assert short_text(counts) == "1/2 MatMul, 1/1 Conv" and short_text(None) == ""


def test_coverage_words():
    assert coverage_text({"MatMul": [46, 48], "Conv": [0, 0]}, "int8") == "INT8: 46 of 48 MatMul ops"
    fp32 = coverage_text({"MatMul": [0, 3], "Conv": [0, 0]}, "int8")
    assert fp32 == "INT8: 0 of 3 MatMul ops (the model runs in FP32)"
    assert coverage_text(NONE, "bf16") == "INT8: 0 of 2 MatMul, 0 of 2 Conv ops (the model runs in BF16)"
    assert coverage_text(NONE, None) == "INT8: 0 of 2 MatMul, 0 of 2 Conv ops (no op runs in INT8)"
    assert coverage_text({"MatMul": [0, 0], "Conv": [0, 0]}, "int8") == "INT8: no MatMul or Conv ops in the model"
    assert coverage_text(None, "int8") is None


@pytest.fixture(scope="module")
def cnn_source(keras3_cnn, tmp_path_factory):
    return to_saved_model(keras3_cnn, str(tmp_path_factory.mktemp("coverage_source")))


def _job(backend: str, source, digits, workdir) -> TrialJob:
    _, (xte, _) = digits
    calib = make_batches(xte[:64], source.inputs, sample_size=64).calibration()
    return TrialJob(source=source, backend=backend, options=BackendOptions(), precision="int8", approach="static",
                    calibration=calib, measure_latency=False, compare_fp32=False, workdir=str(workdir))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "inc"])
def test_each_backend_counts_its_quantized_graph(backend, cnn_source, digits, tmp_path):
    job = _job(backend, cnn_source, digits, tmp_path)
    full = run_trial(job, TrialConfig.make())
    assert not full.failed, full.traceback
    assert full.int8_ops == FULL
    engine, prepared = _backend_and_prepared(job)
    every = engine.search_space(prepared, "int8", "static").fallback_candidates
    fp32 = run_trial(job, TrialConfig.make(fallback=every))  # the "INT8" result that is all FP32
    assert not fp32.failed, fp32.traceback
    assert fp32.int8_ops == NONE
    assert Report(backend=backend, precision="int8", int8_ops=fp32.int8_ops).int8_coverage_text() == ALL_FP32_TEXT
    if backend == "openvino" and "bf16" in engine.precisions:  # a BF16 result: no INT8, says BF16
        bf16 = engine.quantize(prepared, "bf16", TrialConfig.make(), None)
        assert bf16.int8_ops() == NONE and "runs in BF16" in coverage_text(bf16.int8_ops(), "bf16")


def test_report_json_table_html_cli_diagnose_and_saved_model_carry_it(keras3_cnn, digits, tmp_path, capsys, caplog):
    from pipelines.cli import cmd_report

    _, (xte, _) = digits
    q = nano_tfx.quantize(keras3_cnn, accelerator="onnxruntime", calib_dataset=xte[:64])
    report = q.report
    assert report.trials[0].int8_ops == report.int8_ops == q.int8_ops == FULL
    again = Report.from_json(report.to_json())
    assert again.int8_ops == FULL and again.trials[0].int8_ops == FULL
    text = "INT8: 2 of 2 MatMul, 2 of 2 Conv ops"
    assert report.int8_coverage_text() == text
    assert text in report.table().splitlines()[0] and "| int8 ops |" in report.table()
    assert "| 2/2 MatMul, 2/2 Conv |" in report.table()
    page = report.to_html()
    assert "<th>INT8 coverage</th><td>" + text in page and "<td>2/2 MatMul, 2/2 Conv</td>" in page
    with caplog.at_level(logging.INFO, logger="nano_tfx"):
        assert q.diagnose(xte[:16])  # the per-layer rows; the coverage goes to the log
    assert text in caplog.text
    q.save(str(tmp_path / "model"))
    loaded = nano_tfx.load(str(tmp_path / "model"))
    assert loaded.int8_ops == FULL and loaded.candidate.int8_ops() == FULL  # report.json and the graph agree
    cmd_report(argparse.Namespace(path=str(tmp_path / "model"), format="table", layers=False))
    assert text in capsys.readouterr().out


def _all_fp32_report() -> Report:
    trial = TrialRecord(index=0, key="k", backend="openvino", precision="int8", config={"fallback": ["a", "b"]},
                        metric=0.97, passed=True, int8_ops={"MatMul": [0, 3], "Conv": [0, 0]})
    return Report(backend="openvino", precision="int8", metric_name="accuracy", baseline=0.97,
                  criterion={"relative": 0.001, "higher_is_better": True}, trials=[trial], chosen=0, met=True,
                  fp32_latency_ms=0.5, speedup=1.0, int8_ops=trial.int8_ops)


def test_an_all_fp32_result_says_so_in_report_and_blessing():
    from components.quantizer.decision import QuantizerDecision

    report = _all_fp32_report()
    words = "INT8: 0 of 3 MatMul ops (the model runs in FP32)"
    assert words in report.table().splitlines()[0]
    assert words in report.to_html()
    crit = report.criterion
    d = QuantizerDecision(fp32_model="/m", fp32_model_id=1, signature_name="serving_default", accelerator="openvino",
                          precision="int8", beam_runner="DirectRunner", metric="accuracy", baseline=0.97,
                          user_criterion=crit, effective_criterion=crit, min_speedup=0.0)
    d.judge(report, met=True, speed_refused=False)
    assert d.blessed and d.blessing_message.endswith("; " + words)  # judged like any other candidate
    old = Report.from_dict({k: v for k, v in report.to_dict().items() if k != "int8_ops"})  # written before 0.3
    assert old.int8_ops is None and old.int8_coverage_text() is None and "INT8:" not in old.table()
