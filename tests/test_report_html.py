"""report.html reads as a page (issue 17, item 5): it fits a 1280-px window, shows no escaped
characters or Python/JSON reprs, names every plotted series in the legend, shows the speed once,
marks the worst layers, and lists trials per worker as a table.

Plain dataclasses only (no quantization, no pipeline): the Report the engine writes and the
Quantizer's decision that the TFX executor adds. The width check renders the page in headless
Chromium when it is installed (Debian's ``chromium``) and is skipped otherwise.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess

import pytest

from components.quantizer.decision import QuantizerDecision, report_html
from nano_tfx import report_page
from nano_tfx.report import Report, TrialRecord

LONG_LAYER = "sequential/residual_block_{i}/depthwise_conv2d_with_a_long_generated_name_{i}/BiasAdd"
KNOBS = {"activation_type": "uint8", "approach": "static", "calibrate_method": "Percentile", "format": "QDQ",
         "per_channel": True, "reduce_range": False}


def _report() -> Report:
    """A report with everything that used to overflow: long configs, a long error, long layer names."""
    layers = [{"name": LONG_LAYER.format(i=i), "backend": "onnxruntime", "op": "Conv", "own_error": 0.2 / (i + 1),
               "added_mse": 0.3 / (i + 1), "sqnr_db": 18.0 + i, "mse": 0.01, "fp32_min": -3.2, "fp32_max": 1234.5,
               "outlier_ratio": 12.3, "range_ratio": 1500.0, "metric_gain": 0.04 if i == 3 else None}
              for i in range(30)]
    trials = [
        TrialRecord(index=i, key=f"k{i}", backend=("onnxruntime", "openvino", "inc")[i % 3], precision="int8",
                    config={"knobs": KNOBS, "fallback": [LONG_LAYER.format(i=j) for j in range(i)]},
                    metric=0.975 - 0.006 * i, passed=i < 3, latency_ms=0.016 + 0.002 * i, speedup=30.28 - i,
                    fp32_latency_ms=0.5, size_bytes=48_500 + i, seconds=2.8, worker=f"worker-host:{4100 + i % 2}",
                    int8_ops={"MatMul": [46 - i, 48], "Conv": [12, 12], "Attention": [0, 4]})
        for i in range(6)
    ]
    trials.append(TrialRecord(
        index=6, key="k6", backend="openvino", precision="int8", config={"knobs": KNOBS, "fallback": []},
        status="failed", worker="worker-host:4100",
        error="RuntimeError: quantization failed (openvino): GarbageModelError: the quantized model gives the same "
              "output for all 16 calibration rows (the FP32 model does not)"))
    return Report(
        backend="onnxruntime", precision="int8", metric_name="sparse_categorical_accuracy", baseline=0.9749,
        criterion={"relative": 0.01, "higher_is_better": True}, strategy="basic", trials=trials, chosen=1, met=True,
        seconds=42.0, fp32_latency_ms=0.478, speedup=25.39, min_speedup=1.0, stop_reason="criterion met",
        engine_fp32_latency_ms=0.0351, int8_gain=0.0351 * 25.39 / 0.478, result_backend="onnxruntime",
        layers=layers, metric_evaluations=7, int8_ops={"MatMul": [45, 48], "Conv": [12, 12], "Attention": [0, 4]},
        kept_fp32=[{"name": LONG_LAYER.format(i=3), "backend": "onnxruntime",
                    "reason": "keeping it in FP32 raised the metric by 0.04 (adds relative MSE 0.05)"}],
    )


def _decision(report: Report) -> QuantizerDecision:
    d = QuantizerDecision(
        fp32_model="/tmp/pipeline_root/Trainer/model/7/Format-Serving", fp32_model_id=13,
        signature_name="from_transformed_features", accelerator="onnxruntime", precision="int8",
        beam_runner="DirectRunner", notes=["the Trainer model has no 'from_transformed_features' signature: derived "
                                           "it from /tmp/a/very/long/path/" + "x" * 150],
        evaluator={"metrics": {"sparse_categorical_accuracy": 0.9749}}, metric="sparse_categorical_accuracy",
        baseline=0.9749, baseline_source="evaluator", value_bounds={"lower_bound": 0.9, "upper_bound": None},
        user_criterion={"relative": 0.01, "higher_is_better": True},
        effective_criterion={"relative": 0.01, "higher_is_better": True}, min_speedup=1.0, label_key="label_xf",
        calibration_split="train", evaluation_split="eval", sample_size=100, trial_parallelism=2,
        tuning_runner="beam:DirectRunner", backend="onnxruntime",
        serving_dir="/tmp/pipeline_root/Quantizer/quantized_model/9/Format-Serving", seconds=14.46,
    )
    d.judge(report, met=True, speed_refused=False)
    return d


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    report = _report()
    return {"engine": report.to_html(report_page.plot_png_base64(report)),
            "tfx": report_html(report, _decision(report))}


def _visible_text(page: str) -> str:
    page = re.sub(r"(?s)<style>.*?</style>|<script.*?</script>", " ", page)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


@pytest.mark.parametrize("which", ["engine", "tfx"])
def test_no_escapes_or_reprs(pages, which):
    page = pages[which]
    assert "\\u" not in page and "\\u" not in html.unescape(page)
    unescaped = html.unescape(page)  # autoescape turns ' into &#39;: look at what the browser shows
    assert "{'" not in unescaped and '{"' not in unescaped
    text = _visible_text(page)
    assert "None" not in text and "[0.9" not in text
    assert "≤ 1 % relative drop" in text
    assert "25.39×" in text


def test_tfx_sections_are_worded(pages):
    text = _visible_text(pages["tfx"])
    assert "TFX decision" in text and "Evaluator's bounds ≥ 0.9" in text
    assert "within the criterion (≤ 1 % relative drop) and the Evaluator's bounds (≥ 0.9)" in text
    # trials per worker: a small table, reused trials not counted
    assert re.search(r"<th>worker</th><th>trials</th>", pages["tfx"])
    assert re.search(r'<td>worker-host:4100</td><td class="num">4</td>', pages["tfx"])
    assert re.search(r'<td>worker-host:4101</td><td class="num">3</td>', pages["tfx"])


def test_speed_shown_once_with_what_it_measures(pages):
    report = _report()
    page = pages["engine"]
    assert html.unescape(page).count(report.speed_summary()) == 1  # autoescape: engine's -> engine&#39;s
    text = _visible_text(page)
    assert "timed side by side at the end of the call" in text
    assert "1.86× the same engine's FP32 (onnxruntime 0.035 ms)" in text  # beside the 25.39× over TF
    assert "both timed while that trial ran" in text  # why a row's 29.28× is not the summary's 25.39×


def test_worst_layers_are_marked(pages):
    page = pages["engine"]
    # the worst layer, the one kept in FP32 (index 3, whose fallback also raised the metric)
    assert page.count('<tr class="worst">') == 2
    assert page.count("kept in FP32</span>") == 1
    assert "10 more layers" in page  # the rest folds under <details>


def test_plot_legend_names_every_series():
    fig = report_page.plot_figure(_report())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"passed trial", "failed criterion", "chosen", "FP32 baseline"} <= set(labels)
    assert "FP32 (0.478 ms)" in labels and "criterion bound (≤ 1 % relative drop)" in labels


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
@pytest.mark.parametrize("which", ["engine", "tfx"])
def test_page_fits_a_1280_px_window(pages, which, tmp_path):
    probe = ('<script>window.addEventListener("load", function () {'
             'document.body.setAttribute("data-scroll-width", document.documentElement.scrollWidth);});</script>')
    path = tmp_path / "report.html"
    path.write_text(pages[which].replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r'data-scroll-width="(\d+)"', proc.stdout)
    assert m, f"no width in Chromium's DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert int(m.group(1)) <= 1280


def test_layer_names_stay_whole_in_the_page(pages):
    # a <wbr> after each "/" lets long names wrap; the cell's title keeps the name searchable
    assert f'title="{LONG_LAYER.format(i=0)}"' in pages["engine"]
