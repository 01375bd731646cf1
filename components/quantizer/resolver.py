"""``LatestQuantizationReportStrategy``: the newest Quantizer report that has trials.

Wire it to the Quantizer's ``previous_report`` so a rerun resumes::

    report_resolver = tfx.dsl.Resolver(
        strategy_class=LatestQuantizationReportStrategy,
        report=tfx.dsl.Channel(type=QuantizationReport),
    ).with_id("latest_quantization_report_resolver")
    Quantizer(..., previous_report=report_resolver.outputs["report"])

Unlike ``LatestArtifactStrategy`` it resolves to an empty list (not an error) on the first run
and skips reports of runs that quantized nothing (e.g. the FP32 model was not blessed).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from tfx import types
from tfx.dsl.components.common import resolver


class LatestQuantizationReportStrategy(resolver.ResolverStrategy):
    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        result = {}
        for key, artifacts in input_dict.items():
            with_trials = [a for a in artifacts if a.get_int_custom_property("num_trials") > 0]
            latest = sorted(with_trials, key=lambda a: a.id, reverse=True)[:1]
            result[key] = latest
        return result
