"""A stand-in for Prometheus' query API that answers the canary analysis from a script."""

from __future__ import annotations

import re

from fineserve.core.canary_analysis import Sample

LABELS = {"negative": 30.0, "neutral": 40.0, "positive": 30.0}


def sample(requests=100.0, errors=0.0, p99=0.05, labels=None, confidence=0.8) -> Sample:
    """One side's metrics over a window; the defaults are a healthy predictor's."""
    return Sample(requests, errors, p99, dict(LABELS if labels is None else labels), confidence)


class ScriptedPrometheus:
    """Answers the analysis' queries from a script of windows {version: Sample}.

    Its ``advance`` is the analysis' sleep: each held interval moves to the next window; a
    window that is an exception is raised instead (Ctrl-C).
    """

    def __init__(self, windows: list) -> None:
        self.windows, self.index, self.slept = windows, -1, 0.0

    def advance(self, seconds: float) -> None:
        self.index += 1
        self.slept += seconds
        if isinstance(self.windows[self.index], BaseException):
            raise self.windows[self.index]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        version = re.search(r'model_version="([^"]+)"', promql).group(1)
        window = self.windows[self.index]
        s = window.get(version) or sample()
        if "fineserve_predictions_total" in promql:
            return [({"label": k}, v) for k, v in s.labels.items()]
        if "code=~" in promql:
            return [({}, s.errors)]
        if "fineserve_requests_total" in promql:
            return [({}, s.requests)]
        if "histogram_quantile" in promql:
            return [({}, s.p99)] if s.p99 is not None else []
        return [({}, s.confidence)]
