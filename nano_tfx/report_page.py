"""The report as a page people read: ``Report.to_html`` and ``Report.plot_png`` live here.

Numbers stay at full precision in ``Report``; this module is where they are rounded and worded
("≤ 1 % relative drop", "≥ 0.9702"), because only here does a person read them.
"""
from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from nano_tfx.coverage import short_text
from nano_tfx.criterion import AccuracyCriterion, describe_criterion

if TYPE_CHECKING:  # report.py imports this module lazily; no cycle at run time
    from nano_tfx.report import Report, TrialRecord

# Columns of the page's trial table (the markdown table keeps Report._COLUMNS).
TRIAL_COLUMNS = ("#", "backend", "precision", "config", "metric", "passed", "latency b1 (ms)",
                 "speed-up when tried", "INT8 ops", "size (KB)", "time (s)", "status")
LAYER_ROWS_SHOWN = 20  # the rest of the per-layer table folds under a <details>
CHART_LAYERS = 12


def _template(name: str):
    """A template shipped in ``nano_tfx/templates`` (package data; works from an editable
    install too, since it is read from the package directory)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nano_tfx", "templates"),
        autoescape=True,  # every value is user/model text: escape all of it
        trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template(name)


def _num(v: float | None, spec: str = "{:.4f}") -> str:
    return "" if v is None else spec.format(v)


def _criterion(report: "Report") -> AccuracyCriterion | None:
    try:
        return AccuracyCriterion.parse(report.criterion)
    except ValueError:
        return None


def bound_text(report: "Report") -> str | None:
    """"≥ 0.9702": the worst metric the criterion accepts (None without criterion or baseline)."""
    crit = _criterion(report)
    if crit is None or report.baseline is None:
        return None
    return f"{'≥' if crit.higher_is_better else '≤'} {crit.bound(report.baseline):.4f}"


def summary_rows(report: "Report") -> list[tuple[str, str]]:
    """The page's head: result, accuracy, speed (once, with what it measures) and the search."""
    chosen = report.chosen_trial
    met = {True: "criterion met", False: "criterion NOT met", None: "no accuracy control"}[report.met]
    if chosen is not None:
        result = f"{chosen.backend} {chosen.precision.upper()}, trial #{chosen.index}; {met}"
        if report.precision == "auto":
            result += " (precision='auto': the fastest rung of the ladder below)"
    else:
        result = f"{report.backend} {report.precision.upper()}, " + (f"no trial chosen; {met}" if report.trials
                                                                     else "no trial ran")
    rows = [("Result", result)]
    if report.baseline is not None:
        name = report.metric_name or "metric"
        value = f"{name} {chosen.metric:.4f} vs FP32 {report.baseline:.4f}" if chosen and chosen.metric is not None \
            else f"FP32 {name} {report.baseline:.4f}"
        bound = bound_text(report)
        rows.append(("Accuracy", f"{value}; criterion {describe_criterion(report.criterion)}"
                                 + (f" (metric {bound})" if bound else "")))
    speed = report.speed_summary()
    if report.speedup is not None:
        timed = "the returned model, FP32 and the engine's FP32" if report.int8_gain is not None else \
            "the returned model and FP32"
        speed += f" (batch 1; {timed} timed side by side at the end of the call)"
    rows.append(("Speed", speed))
    if report.smoothing:
        rows.append(("Smoothing", report.smoothing))
    coverage = report.int8_coverage_text()
    if coverage:  # ops counted in the returned model's graph: "INT8" that is mostly FP32 shows here
        rows.append(("INT8 coverage", coverage))
    reused = sum(t.status == "reused" for t in report.trials)
    failed = sum(t.failed for t in report.trials)
    n = len(report.trials)
    search = f"{n} trial{'' if n == 1 else 's'} ({reused} reused, {failed} failed)"
    if report.strategy:
        search += f", strategy {report.strategy}"
    search += f", {report.seconds:.1f} s"
    if report.metric_evaluations:
        e = report.metric_evaluations
        search += f", {e} metric evaluation{'' if e == 1 else 's'}"
    if report.stop_reason:
        search += f"; stopped: {report.stop_reason}"
    rows.append(("Search", search))
    return rows


def _config_text(t: "TrialRecord") -> tuple[str, str]:
    """(shown, hover): knobs with spaces to wrap at, FP32 layers counted (named on hover)."""
    cfg = t.config or {}
    parts = [f"{k}={v}" for k, v in (cfg.get("knobs") or {}).items()]
    fallback = [str(n) for n in cfg.get("fallback") or []]
    if fallback:
        parts.append(f"{len(fallback)} layer{'s' if len(fallback) > 1 else ''} in FP32")
    return ", ".join(parts) or "default", ", ".join(fallback)


def trial_rows(report: "Report") -> list[dict]:
    out = []
    for t in report.trials:
        config, hover = _config_text(t)
        if t.failed:
            css, status = "failed", f"failed: {(t.error or '')[:160]}"
        else:
            css, status = ("miss" if t.passed is False else ""), t.status
        if t.index == report.chosen:
            css = "chosen"
        out.append({
            "css": css, "config_title": hover,
            "cells": [f"{t.index}{' ★' if t.index == report.chosen else ''}", t.backend, t.precision, config,
                      _num(t.metric), "" if t.passed is None else ("yes" if t.passed else "no"),
                      _num(t.latency_ms, "{:.3f}"), _num(t.speedup, "{:.2f}×"), short_text(t.int8_ops),
                      _num(None if t.size_bytes is None else t.size_bytes / 1024, "{:.1f}"),
                      f"{t.seconds:.1f}", status],
        })
    return out


def speed_note(report: "Report") -> str | None:
    """One line on why a trial row's speed-up differs from the summary's (two timings)."""
    if not any(t.speedup is not None for t in report.trials):
        return None
    chosen = report.chosen_trial
    final = f" ({report.speedup:.2f}× for trial #{chosen.index})" if chosen and report.speedup else ""
    return ("“Speed-up when tried” divides FP32's batch-1 time by the trial's, both timed while that trial "
            "ran; the speed above re-times the returned model beside FP32 at the end of the call"
            f"{final} and is the one the speed gate uses. The two differ by machine noise.")


def _worst(report: "Report") -> list[bool]:
    """Rows to mark: the worst layer, layers kept in FP32, layers whose FP32 fallback measurably
    raised the metric (what the search found to matter, not an arbitrary top-k)."""
    kept = {k.get("name") for k in report.kept_fp32}
    return [i == 0 or r.get("name") in kept or r.get("rescued") or (r.get("metric_gain") or 0) > 0
            for i, r in enumerate(report.layers)]


def layer_rows(report: "Report") -> list[dict]:
    kept = {k.get("name") for k in report.kept_fp32}
    return [{"worst": worst, "kept": r.get("name") in kept, "cells": cells}
            for r, worst, cells in zip(report.layers, _worst(report), report.layer_rows())]


def chart(report: "Report", top: int = CHART_LAYERS) -> dict | None:
    """Bars of the worst layers' added error (SVG geometry for the template)."""
    worst = report.layers[:top]
    if not worst:
        return None
    peak = max([r.get("added_mse") or 0.0 for r in worst] + [1e-12])
    names = [str(r.get("name")) for r in worst]
    labels = [n if len(n) <= 48 else "…" + n[-47:] for n in names]  # the tail names the layer
    left = 7 * max([len(s) for s in labels] + [10])
    marked = _worst(report)
    bars = [
        {"y": 16 * i, "label": label, "w": max(1, int(300 * max(r.get("added_mse") or 0.0, 0.0) / peak)),
         "value": f"{r.get('added_mse') or 0.0:.3g}", "color": "#d9534f" if marked[i] else "#5b8def"}
        for i, (r, label) in enumerate(zip(worst, labels))
    ]
    return {"bars": bars, "left": left, "width": left + 380, "height": 16 * len(bars) + 4}


def render(report: "Report", plot_png_base64: str | None = None, extra_sections: list[dict] | None = None) -> str:
    """The page (template ``nano_tfx/templates/report.html.j2``); see ``Report.to_html``."""
    layers = layer_rows(report)
    return _template("report.html.j2").render(
        summary=summary_rows(report), columns=TRIAL_COLUMNS, trials=trial_rows(report),
        speed_note=speed_note(report), plot=plot_png_base64, kept_fp32=report.kept_fp32,
        ladder=[{**r, "ms": _num(r.get("latency_ms"), "{:.4g}")} for r in report.ladder],
        chart=chart(report), layer_columns=report._LAYER_COLUMNS,
        layers_shown=layers[:LAYER_ROWS_SHOWN], layers_more=layers[LAYER_ROWS_SHOWN:],
        extra_sections=extra_sections or [],
    )


# -- the plot ------------------------------------------------------------------------------------
def plot_figure(report: "Report") -> Any | None:
    """Latency vs metric of the trials, every series in the legend; None when nothing to plot."""
    points = [t for t in report.trials if t.latency_ms is not None and t.metric is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    labels = {True: "passed trial", False: "failed criterion", None: "trial (no criterion)"}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    handles = []
    for passed in (True, False, None):  # one series per kind, one legend entry each (chosen included)
        kind = [t for t in points if t.passed is passed]
        group = [t for t in kind if t.index != report.chosen]
        if group:
            ax.scatter([t.latency_ms for t in group], [t.metric for t in group], marker="o", color=colors[passed], s=30)
        if kind:
            handles.append(Line2D([], [], marker="o", color=colors[passed], linestyle="", label=labels[passed]))
    chosen = next((t for t in points if t.index == report.chosen), None)
    if chosen is not None:
        ax.scatter(chosen.latency_ms, chosen.metric, marker="*", color=colors[chosen.passed], s=160,
                   edgecolors="black", linewidths=0.6, zorder=3)
        # the legend's star in black: it marks the choice, its colour already says passed/failed
        handles.append(Line2D([], [], marker="*", color="black", linestyle="", markersize=11, label="chosen"))
    for t in points:
        ax.annotate(f"{t.backend}/{t.precision}#{t.index}", (t.latency_ms, t.metric), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if report.fp32_latency_ms is not None and report.baseline is not None:  # the model being replaced
        handles.append(ax.scatter(report.fp32_latency_ms, report.baseline, marker="s", color="black", s=40,
                                  label=f"FP32 ({report.fp32_latency_ms:.3g} ms)"))
    if report.baseline is not None:
        handles.append(ax.axhline(report.baseline, color="gray", linestyle="--", linewidth=1,
                                  label="FP32 baseline"))
        crit = _criterion(report)
        if crit is not None:
            handles.append(ax.axhline(crit.bound(report.baseline), color="tab:red", linestyle=":", linewidth=1,
                                      label=f"criterion bound ({crit.describe()})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("latency at batch 1 (ms)")
    ax.set_ylabel(report.metric_name or "metric")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png_bytes(report: "Report", dpi: int = 100) -> bytes | None:
    fig = plot_figure(report)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)
    return buf.getvalue()


def plot_png_base64(report: "Report") -> str | None:
    png = plot_png_bytes(report)
    return None if png is None else base64.b64encode(png).decode()
