"""The ``QuantizationReport`` artifact: every trial as JSON plus an HTML page (table + plot)."""
from __future__ import annotations

from tfx.types import artifact

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


class QuantizationReport(artifact.Artifact):
    """Output of the Quantizer: ``report.json`` (all trials, baseline, decision) + ``report.html``.

    Fed back as the Quantizer's ``previous_report`` input, finished trials of the same model
    fingerprint and configuration are reused instead of re-run.
    """

    # KFP v2 needs "namespace.TypeName" for custom artifact types (its schema title).
    TYPE_NAME = "nano_tfx.QuantizationReport"
