"""Progressive canary analysis: step a canary's traffic up while Prometheus says it is healthy.

Every interval, the canary and the stable predictor are compared on the predictor's own
metrics (`fineserve_*`, labelled with the model name and version that answered):

- **traffic**: each side answered at least ``min_requests`` in the window, else the check is
  inconclusive (neither pass nor failure);
- **success rate** (share of answers that are not 5xx or a gRPC server error): at least
  ``min_success_rate``, and at most ``max_success_drop`` below stable's;
- **p99 latency**: at most ``max_p99_seconds``, and not above stable's by both the factor
  ``max_p99_ratio`` and the margin ``p99_margin_seconds``;
- **label distribution**: the Jensen-Shannon divergence (base 2, 0 to 1) between the labels the
  canary and the stable predictor predicted, at most ``max_label_divergence``;
- **confidence**: the canary's mean top-class probability at most ``max_confidence_drop``
  below stable's.

A step passes with a passing check; the traffic then moves to the next step; the last step
(100) is a promotion that moves the MLflow aliases as `fineserve rollout promote` does. After
``threshold`` failed checks (in all, not in a row) the canary is rolled back, `champion` stays.
Only one analyzer works on an InferenceService at a time: it holds a lease (an annotation with
its owner and expiry) that it renews each interval.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from string import Template
from typing import TYPE_CHECKING, Any

from fineserve.core import rollout as rollout_ops
from fineserve.core.errors import ClusterError, ParameterError
from fineserve.core.inference_service import Rollout, Track, read_rollout

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fineserve.core.cluster import Cluster

LEASE_ANNOTATION = "fineserve.io/analysis-lease"
DEFAULT_STEPS = (10, 25, 50, 100)

#: Endpoints that classify texts (HTTP v1/v2, gRPC).
_INFER_ENDPOINTS = ".*/infer|.*:predict|ModelInfer"
#: Status codes of server errors and of refused requests (client errors), HTTP and gRPC, as
#: google.rpc.Code maps gRPC's to HTTP's (googleapis google/rpc/code.proto). A client that gave
#: up is neither: HTTP 499, gRPC CANCELLED (499 there) and DEADLINE_EXCEEDED, which the predictor
#: records only when the client's deadline passed (slowness is the p99 check's to judge).
SERVER_ERRORS = "5..|UNKNOWN|INTERNAL|UNIMPLEMENTED|UNAVAILABLE|DATA_LOSS"
CLIENT_ERRORS = (
    "4..|INVALID_ARGUMENT|FAILED_PRECONDITION|OUT_OF_RANGE|UNAUTHENTICATED|PERMISSION_DENIED|"
    "NOT_FOUND|ALREADY_EXISTS|ABORTED|RESOURCE_EXHAUSTED"
)
_SELECTOR = 'model_name="$model",model_version="$version"'
_REQUESTS = f'{_SELECTOR},endpoint=~"{_INFER_ENDPOINTS}"'

#: PromQL per check (`string.Template`: $model, $version, $window); `--query NAME=...` overrides.
QUERIES: dict[str, str] = {
    "requests": f"sum(increase(fineserve_requests_total{{{_REQUESTS}}}[$window]))",
    "errors": (
        f'sum(increase(fineserve_requests_total{{{_REQUESTS},code=~"{SERVER_ERRORS}"}}[$window]))'
    ),
    "p99": (
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(fineserve_request_seconds_bucket{{{_REQUESTS}}}[$window])))"
    ),
    "labels": f"sum by (label) (increase(fineserve_predictions_total{{{_SELECTOR}}}[$window]))",
    "confidence": (
        f"sum(increase(fineserve_top_probability_sum{{{_SELECTOR}}}[$window])) / "
        f"sum(increase(fineserve_top_probability_count{{{_SELECTOR}}}[$window]))"
    ),
}


@dataclass(frozen=True)
class Thresholds:
    """What a canary must meet in each interval (see the module docstring)."""

    min_requests: int = 50
    min_success_rate: float = 0.99
    max_success_drop: float = 0.01
    max_p99_seconds: float = 1.0
    max_p99_ratio: float = 1.5
    p99_margin_seconds: float = 0.025
    max_label_divergence: float = 0.1
    max_confidence_drop: float = 0.1

    def check(self) -> None:
        """A ParameterError naming the first threshold out of its range."""
        shares = ("min_success_rate", "max_success_drop", "max_label_divergence")
        for name in (*shares, "max_confidence_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParameterError(f"{name} must be within 0-1, got {getattr(self, name)}")
        for name in ("min_requests", "max_p99_seconds", "p99_margin_seconds"):
            if getattr(self, name) < 0:
                raise ParameterError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_p99_ratio < 1:
            raise ParameterError(f"max_p99_ratio must be at least 1, got {self.max_p99_ratio}")


@dataclass(frozen=True)
class Settings:
    """How the analysis runs."""

    steps: tuple[int, ...] = DEFAULT_STEPS
    interval: float = 60.0  # seconds a step is held before its check (also the query window)
    threshold: int = 2  # failed checks before the rollback
    max_inconclusive: int = 10  # inconclusive checks in a row before giving up (traffic stays)
    thresholds: Thresholds = field(default_factory=Thresholds)
    queries: Mapping[str, str] = field(default_factory=lambda: dict(QUERIES))

    def check(self) -> None:
        """A ParameterError naming the first setting out of its range."""
        if not self.steps or any(not 0 < s <= 100 for s in self.steps):
            raise ParameterError(f"steps must be percentages within 1-100, got {self.steps}")
        if list(self.steps) != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ParameterError(f"steps must rise strictly and end at 100, got {self.steps}")
        if self.interval <= 0:
            raise ParameterError(f"interval must be positive, got {self.interval}")
        if self.threshold < 1 or self.max_inconclusive < 1:
            raise ParameterError("threshold and max_inconclusive must be at least 1")
        unknown = set(self.queries) - set(QUERIES)
        if unknown:
            raise ParameterError(f"unknown queries {sorted(unknown)}; known: {sorted(QUERIES)}")
        for name, template in self.queries.items():
            try:
                Template(template).substitute(model="m", version="1", window="1s")
            except (KeyError, ValueError) as err:
                raise ParameterError(
                    f"query {name!r}: bad template ({err}); it may use $model, $version, $window"
                ) from None
        self.thresholds.check()


# ---------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One side's metrics over a window (None: Prometheus had no value)."""

    requests: float
    errors: float
    p99: float | None
    labels: dict[str, float]
    confidence: float | None

    @property
    def success_rate(self) -> float | None:
        """Share of answers that were not server errors."""
        return None if self.requests <= 0 else 1 - self.errors / self.requests


class Prometheus:
    """Instant queries against Prometheus' HTTP API."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """The instant vector (or scalar) of ``promql`` as (labels, value) pairs."""
        import httpx

        try:
            response = httpx.get(
                f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout
            )
        except httpx.HTTPError as err:
            raise ClusterError(f"cannot reach Prometheus at {self.url}: {err}") from err
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            raise ClusterError(
                f"Prometheus at {self.url} refused the query {promql!r}: HTTP "
                f"{response.status_code}: {body.get('error') or response.text[:200]}"
            )
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]


def measure(
    prometheus: Prometheus, queries: Mapping[str, str], model: str, version: str, window: str
) -> Sample:
    """One side's metrics over the last ``window``."""

    def run(name: str) -> list[tuple[dict[str, str], float]]:
        promql = Template(queries[name]).substitute(model=model, version=version, window=window)
        found = prometheus.query(promql)
        return [(labels, value) for labels, value in found if math.isfinite(value)]

    def scalar(name: str) -> float | None:
        found = run(name)
        return sum(value for _, value in found) if found else None

    return Sample(
        requests=scalar("requests") or 0.0,
        errors=scalar("errors") or 0.0,
        p99=scalar("p99"),
        labels={labels.get("label", ""): value for labels, value in run("labels")},
        confidence=scalar("confidence"),
    )


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence (base 2: 0 for the same distribution, 1 for disjoint ones)."""
    keys = set(p) | set(q)
    p_total, q_total = sum(p.values()), sum(q.values())
    if p_total <= 0 or q_total <= 0:
        return math.nan
    divergence = 0.0
    for key in keys:
        a, b = p.get(key, 0.0) / p_total, q.get(key, 0.0) / q_total
        m = (a + b) / 2
        divergence += sum(x * math.log2(x / m) for x in (a, b) if x > 0) / 2
    return max(0.0, min(1.0, divergence))


# ---------------------------------------------------------------------------- judging


@dataclass
class Check:
    """One rule applied to one window."""

    name: str
    passed: bool | None  # None: inconclusive
    value: float | None
    limit: str
    detail: str = ""

    def line(self) -> str:
        """The check as a report line."""
        verdict = {True: "pass", False: "FAIL", None: "inconclusive"}[self.passed]
        value = "-" if self.value is None else f"{self.value:.4g}"
        return f"{self.name:<18}{verdict:<13}{value:<10} {self.limit}" + (
            f" ({self.detail})" if self.detail else ""
        )


def judge(canary: Sample, stable: Sample, thresholds: Thresholds) -> list[Check]:
    """The checks of one window; a traffic shortfall makes the window inconclusive."""
    t = thresholds
    short = [
        f"{side} {sample.requests:.0f}"
        for side, sample in (("canary", canary), ("stable", stable))
        if sample.requests < max(1, t.min_requests)
    ]
    traffic = Check(
        "traffic",
        None if short else True,
        min(canary.requests, stable.requests),
        f">= {t.min_requests} requests each",
        f"too few: {', '.join(short)}" if short else "",
    )
    if short:
        return [traffic]
    checks = [traffic]

    rate, stable_rate = canary.success_rate, stable.success_rate
    floor = max(t.min_success_rate, stable_rate - t.max_success_drop)
    checks.append(
        Check(
            "success rate",
            rate >= floor,
            rate,
            f">= {floor:.4g} (min {t.min_success_rate:g}, stable {stable_rate:.4g} - "
            f"{t.max_success_drop:g})",
        )
    )

    if canary.p99 is None or stable.p99 is None:
        checks.append(Check("p99 latency", None, canary.p99, "", "no latency data"))
    else:
        relative = stable.p99 * t.max_p99_ratio
        too_slow = canary.p99 > t.max_p99_seconds or (
            canary.p99 > relative and canary.p99 - stable.p99 > t.p99_margin_seconds
        )
        checks.append(
            Check(
                "p99 latency",
                not too_slow,
                canary.p99,
                f"<= {t.max_p99_seconds:g}s and <= stable {stable.p99:.4g}s x "
                f"{t.max_p99_ratio:g} (or + {t.p99_margin_seconds:g}s)",
            )
        )

    divergence = js_divergence(canary.labels, stable.labels)
    checks.append(
        Check(
            "label divergence",
            None if math.isnan(divergence) else divergence <= t.max_label_divergence,
            None if math.isnan(divergence) else divergence,
            f"<= {t.max_label_divergence:g} (Jensen-Shannon vs stable)",
            _distribution(canary.labels) + " vs " + _distribution(stable.labels),
        )
    )

    if canary.confidence is None or stable.confidence is None:
        checks.append(Check("confidence", None, canary.confidence, "", "no probability data"))
    else:
        floor = stable.confidence - t.max_confidence_drop
        checks.append(
            Check(
                "confidence",
                canary.confidence >= floor,
                canary.confidence,
                f">= {floor:.4g} (stable mean top probability {stable.confidence:.4g} - "
                f"{t.max_confidence_drop:g})",
            )
        )
    return checks


def _distribution(counts: Mapping[str, float]) -> str:
    total = sum(counts.values())
    if total <= 0:
        return "{}"
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items()) if v > 0)
    return "{" + shares + "}"


def verdict(checks: list[Check]) -> bool | None:
    """False if any check failed, None if the window was inconclusive, else True."""
    if any(c.passed is False for c in checks):
        return False
    if checks and checks[0].passed is None:
        return None
    return True


def plan(steps: tuple[int, ...], current: int) -> list[int]:
    """The traffic steps still to take from ``current``: it first, then the steps above it."""
    return [current, *(s for s in steps if s > current)] if current < 100 else [100]


# ---------------------------------------------------------------------------- the lease


@dataclass
class Lease:
    """This analyzer's claim on an InferenceService (an annotation with owner and expiry)."""

    cluster: Cluster
    name: str
    ttl: float
    owner: str = field(
        default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    )
    clock: Callable[[], float] = time.time

    def acquire(self) -> None:
        """Take (or renew) the lease; a ClusterError when another live analyzer holds it."""

        def claim(isvc: dict) -> dict:
            held = holder(isvc, self.clock())
            if held and held["owner"] != self.owner:
                raise ClusterError(
                    f"InferenceService {self.name!r} is being analyzed by {held['owner']} "
                    f"(lease until {time.strftime('%H:%M:%S', time.localtime(held['expires']))}"
                    f"); wait for it, or remove the annotation {LEASE_ANNOTATION} if it died"
                )
            value = json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl})
            return _with_annotation(isvc, value)

        self.cluster.change(self.name, claim)

    def release(self) -> None:
        """Give the lease up (if it is still ours)."""

        def drop(isvc: dict) -> dict | None:
            held = holder(isvc, -math.inf)
            return _with_annotation(isvc, None) if held and held["owner"] == self.owner else None

        self.cluster.change(self.name, drop)


def holder(isvc: dict, now: float) -> dict | None:
    """The live lease on ``isvc`` (owner, expires), or None when there is none or it expired."""
    raw = (isvc["metadata"].get("annotations") or {}).get(LEASE_ANNOTATION)
    try:
        lease = json.loads(raw) if raw else None
        return lease if lease and float(lease["expires"]) > now else None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: nobody's


def _with_annotation(isvc: dict, value: str | None) -> dict:
    annotations = dict(isvc["metadata"].get("annotations") or {})
    if value is None:
        annotations.pop(LEASE_ANNOTATION, None)
    else:
        annotations[LEASE_ANNOTATION] = value
    return {**isvc, "metadata": {**isvc["metadata"], "annotations": annotations}}


# ---------------------------------------------------------------------------- the loop


@dataclass
class Interval:
    """One check: the traffic it was taken at, and its checks."""

    percent: int
    checks: list[Check]

    @property
    def verdict(self) -> bool | None:
        """See `verdict`."""
        return verdict(self.checks)


@dataclass
class Outcome:
    """How an analysis ended."""

    result: str  # promoted, rolled-back, inconclusive, interrupted
    message: str
    history: list[Interval] = field(default_factory=list)
    rollout: Rollout | None = None

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {
            "result": self.result,
            "message": self.message,
            "history": [asdict(i) for i in self.history],
            "rollout": self.rollout.as_dict() if self.rollout else None,
        }


class Interrupted(Exception):
    """Ctrl-C during an analysis (the traffic stays where it is)."""


def served_model_name(isvc: dict) -> str:
    """The model name the predictor answers as (its `--model_name`), else the service's name."""
    for container in isvc.get("spec", {}).get("predictor", {}).get("containers") or []:
        for arg in container.get("args") or []:
            if arg.startswith("--model_name="):
                return arg.split("=", 1)[1]
    return isvc["metadata"]["name"]


def analyze(
    cluster: Cluster,
    name: str,
    prometheus: Prometheus,
    client: MlflowClient,
    settings: Settings,
    *,
    report: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Step the canary of ``name`` up, check each interval, promote or roll back."""
    settings.check()
    isvc = cluster.require(name)
    state = read_rollout(isvc)
    canary, stable = _tracks(state, name)
    model = served_model_name(isvc)
    lease = Lease(cluster, name, ttl=settings.interval * 3 + 60)
    lease.acquire()
    history: list[Interval] = []
    failures = 0
    try:
        for percent in plan(settings.steps, canary.percent):
            if percent == 100:
                after = rollout_ops.promote(cluster, name, client)
                return Outcome(
                    "promoted",
                    f"v{canary.version} passed every step and now serves all traffic; MLflow "
                    f"champion v{canary.version}, previous v{stable.version}",
                    history,
                    after,
                )
            if percent != _current_percent(cluster, name):
                rollout_ops.set_traffic(cluster, name, percent)
                report(f"traffic: canary v{canary.version} at {percent}%")
            inconclusive = 0
            while True:
                _hold(settings.interval, sleep, lease)
                window = f"{max(1, round(settings.interval))}s"
                checks = judge(
                    measure(prometheus, settings.queries, model, canary.version, window),
                    measure(prometheus, settings.queries, model, stable.version, window),
                    settings.thresholds,
                )
                interval = Interval(percent, checks)
                history.append(interval)
                report(_interval_report(interval, len(history)))
                if interval.verdict is True:
                    break
                if interval.verdict is None:
                    inconclusive += 1
                    if inconclusive >= settings.max_inconclusive:
                        return Outcome(
                            "inconclusive",
                            f"{inconclusive} checks in a row at {percent}% had too little "
                            f"data; traffic left at {percent}% (send traffic, or loosen "
                            "--min-requests, and run analyze again to continue)",
                            history,
                            read_rollout(cluster.require(name)),
                        )
                    continue
                failures += 1
                if failures >= settings.threshold:
                    after = rollout_ops.rollback(cluster, name)
                    failed = [c for i in history for c in i.checks if c.passed is False]
                    return Outcome(
                        "rolled-back",
                        f"v{canary.version} failed {failures} checks (threshold "
                        f"{settings.threshold}): {', '.join(sorted({c.name for c in failed}))}; "
                        f"all traffic is back on v{stable.version}, MLflow champion unchanged",
                        history,
                        after,
                    )
    except KeyboardInterrupt:
        current = _current_percent(cluster, name)
        return Outcome(
            "interrupted",
            f"interrupted: traffic left where it is (canary v{canary.version} at {current}%); "
            "run analyze again to continue from there",
            history,
            read_rollout(cluster.require(name)),
        )
    finally:
        lease.release()
    raise AssertionError("the plan always ends at 100")  # pragma: no cover


def _tracks(state: Rollout, name: str) -> tuple[Track, Track]:
    if state.canary is None or state.stable is None:
        raise ClusterError(f"InferenceService {name!r}: no canary in flight, nothing to analyze")
    if state.canary.percent == 0:
        raise ClusterError(
            f"InferenceService {name!r}: the canary v{state.canary.version} was rolled back "
            "(0% traffic); deploy a new version to analyze"
        )
    if not state.canary.version or not state.stable.version:
        raise ClusterError(
            f"InferenceService {name!r}: a predictor lacks the label fineserve.io/model-version, "
            "so its metrics cannot be told apart"
        )
    return state.canary, state.stable


def _current_percent(cluster: Cluster, name: str) -> int:
    canary = read_rollout(cluster.require(name)).canary
    return canary.percent if canary else 0


def _hold(seconds: float, sleep: Callable[[float], None], lease: Lease) -> None:
    sleep(seconds)
    lease.acquire()  # renew


def _interval_report(interval: Interval, number: int) -> str:
    verdict_text = {True: "passed", False: "FAILED", None: "inconclusive"}[interval.verdict]
    lines = [f"check {number} at {interval.percent}%: {verdict_text}"]
    lines += [f"  {check.line()}" for check in interval.checks]
    return "\n".join(lines)


def render(outcome: Outcome) -> str:
    """The final report: every failed check with its value and threshold, and the result."""
    failed = [(i, c) for i in outcome.history for c in i.checks if c.passed is False]
    lines = [f"analysis {outcome.result}: {outcome.message}"]
    if failed:
        lines.append("failed checks:")
        lines += [f"  at {i.percent}%: {c.line()}" for i, c in failed]
    return "\n".join(lines)


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,25,50,100"`` as a tuple; a ParameterError naming the bad item."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ParameterError(f"steps must be comma-separated integers, got {text!r}") from None


def parse_queries(items: list[str]) -> dict[str, Any]:
    """``NAME=TEMPLATE`` overrides on top of the default queries."""
    queries = dict(QUERIES)
    for item in items:
        key, sep, template = item.partition("=")
        if not sep or not template:
            raise ParameterError(f"--query expects NAME=PROMQL, got {item!r}")
        queries[key.strip()] = template
    return queries
