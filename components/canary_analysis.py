"""analyze_canary: after deploy started a canary, step its traffic up on Prometheus' verdict.

The pipeline runs it only when `canary_analysis` is on and deploy started a canary; it runs
`fineserve rollout analyze` (`fineserve.core.canary_analysis`): promote at the end (the MLflow
aliases move), roll back after `analysis_threshold` failed checks (`champion` stays). Its
verdict is an output and a Markdown report, as the gate's is: a rejected canary is a decision,
not a failed step.
"""

from typing import NamedTuple

from kfp.dsl import Markdown, Output

from fineserve.components.decorator import component


def markdown_report(outcome, name: str) -> str:
    """The analysis as Markdown: the verdict, then every check of every interval."""
    lines = [
        "# fineserve canary analysis",
        "",
        f"InferenceService `{name}`: **{outcome.result}**: {outcome.message}.",
        "",
        "| check | at | verdict | value | threshold |",
        "| --- | --- | --- | --- | --- |",
    ]
    for number, interval in enumerate(outcome.history, 1):
        for check in interval.checks:
            verdict = "**FAIL**" if check.verdict == "fail" else check.verdict.value
            value = "-" if check.value is None else f"{check.value:.4g}"
            limit = check.limit + (f" ({check.detail})" if check.detail else "")
            lines.append(
                f"| {number}. {check.name} | {interval.percent}% | {verdict} | {value} | {limit} |"
            )
    return "\n".join(lines) + "\n"


@component
def analyze_canary(
    report: Output[Markdown],
    prometheus_url: str = "",
    tracking_uri: str = "",
    inference_service: str = "fineserve",
    namespace: str = "",
    kube_context: str = "",
    analysis_steps: str = "10,25,50,100",
    analysis_interval: float = 60.0,
    analysis_threshold: int = 2,
    analysis_max_inconclusive: int = 10,
    min_requests: int = 50,
    min_success_rate: float = 0.99,
    max_success_drop: float = 0.01,
    max_client_error_rise: float = 0.05,
    max_p99_seconds: float = 1.0,
    max_p99_ratio: float = 1.5,
    p99_margin_seconds: float = 0.025,
    max_label_divergence: float = 0.1,
    max_confidence_drop: float = 0.1,
) -> NamedTuple("AnalysisOutputs", [("result", str), ("message", str)]):
    """Step the canary's traffic up while Prometheus says it is healthy; promote or roll back.

    Args:
        prometheus_url: Prometheus that scrapes the predictors (e.g.
            http://prometheus-operated.monitoring:9090); required when the analysis is on.
        tracking_uri: MLflow tracking URI; empty for MLFLOW_TRACKING_URI, else a local SQLite
            store.
        inference_service: Name of the InferenceService.
        namespace: Its namespace; empty for the pod's own (in a cluster) or the kube context's.
        kube_context: Kubeconfig context; empty inside a cluster (the pod's ServiceAccount).
        analysis_steps: Canary traffic steps in percent, rising, ending at 100 (the promotion).
        analysis_interval: Seconds each step is held before it is checked (the query window).
        analysis_threshold: Failed checks (in all) before the canary is rolled back.
        analysis_max_inconclusive: Checks in a row with too little traffic before the analysis
            stops, leaving the traffic where it is.
        min_requests: Requests each side must answer in a window for a conclusive check.
        min_success_rate: Lowest share of answers that are not server errors (5xx).
        max_success_drop: How far the canary's success rate may fall below stable's.
        max_client_error_rise: How far the canary's share of refused requests (4xx, gRPC
            client errors such as INVALID_ARGUMENT; not clients that hung up) may rise above
            stable's.
        max_p99_seconds: Highest p99 latency of the canary, in seconds.
        max_p99_ratio: Highest canary p99 as a multiple of stable's (with the margin below).
        p99_margin_seconds: A canary p99 above stable's by less than this passes whatever the
            ratio (histogram buckets make small latencies coarse).
        max_label_divergence: Highest Jensen-Shannon divergence (base 2, 0-1) between the
            labels the canary and stable predicted.
        max_confidence_drop: How far the canary's mean top-class probability may fall below
            stable's.

    Returns:
        report: Output Markdown report of every check (rendered in the Kubeflow UI).
        result: promoted, rolled-back or inconclusive.
        message: What happened, in a sentence.
    """
    import logging
    from collections import namedtuple
    from pathlib import Path

    from fineserve.components import canary_analysis as step
    from fineserve.core import canary_analysis as analysis
    from fineserve.core import registry
    from fineserve.core.cluster import Cluster
    from fineserve.core.errors import ParameterError

    settings = analysis.Settings(
        steps=analysis.parse_steps(analysis_steps),
        interval=analysis_interval,
        threshold=analysis_threshold,
        max_inconclusive=analysis_max_inconclusive,
        thresholds=analysis.Thresholds(
            min_requests=min_requests,
            min_success_rate=min_success_rate,
            max_success_drop=max_success_drop,
            max_client_error_rise=max_client_error_rise,
            max_p99_seconds=max_p99_seconds,
            max_p99_ratio=max_p99_ratio,
            p99_margin_seconds=p99_margin_seconds,
            max_label_divergence=max_label_divergence,
            max_confidence_drop=max_confidence_drop,
        ),
    )
    settings.check()
    if not prometheus_url:
        raise ParameterError(
            "prometheus_url is empty: the canary analysis reads the predictors' metrics from "
            "Prometheus; set it, or turn canary_analysis off"
        )
    log = logging.getLogger("fineserve.components.canary_analysis")
    outcome = analysis.analyze(
        Cluster(context=kube_context, namespace=namespace),
        inference_service,
        analysis.Prometheus(prometheus_url),
        registry.mlflow_client(tracking_uri),
        settings,
        report=log.info,
    )
    log.info("%s", analysis.render(outcome))
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(step.markdown_report(outcome, inference_service))
    return namedtuple("AnalysisOutputs", ["result", "message"])(outcome.result, outcome.message)
