"""Progressive canary analysis: step a canary's traffic up while Prometheus says it is healthy.

Every interval, the canary and the stable predictor are compared on the predictor's own
metrics (`fineserve_*`, labelled with the model name and version that answered):

- **traffic**: each side answered at least ``min_requests`` in the window, else the window is
  inconclusive (neither pass nor failure) and nothing else is judged;
- **success rate** (share of answers that are not 5xx or a gRPC server error): at least
  ``min_success_rate``, and at most ``max_success_drop`` below stable's;
- **client errors** (share of requests refused with a 4xx or a gRPC client-error status): at
  most ``max_client_error_rise`` above stable's; a client that hung up (HTTP 499, gRPC
  CANCELLED or DEADLINE_EXCEEDED) counts as neither kind of error;
- **p99 latency**: at most ``max_p99_seconds``, and not above stable's by both the factor
  ``max_p99_ratio`` and the margin ``p99_margin_seconds``;
- **predictions**: a canary that answered its requests without predicting a single text
  while stable predicted fails;
- **label distribution**: the Jensen-Shannon divergence (base 2, 0 to 1) between the labels the
  canary and the stable predictor predicted, at most ``max_label_divergence``;
- **confidence**: the canary's mean top-class probability at most ``max_confidence_drop``
  below stable's.

A value Prometheus does not give, or gives as NaN or ±Inf, never passes a check: each check
says whether it fails (a p99 of +Inf, beyond the largest bucket) or is inconclusive (NaN, the
0/0 of a window without data). A step passes only when every one of its checks passes; the
traffic then moves to the next step, and the last step (100) is a promotion that moves the
MLflow aliases as `fineserve rollout promote` does. After ``threshold`` failed checks (in all,
not in a row) the canary is rolled back, `champion` stays; after ``max_inconclusive``
inconclusive checks in a row the analysis stops with the traffic where it is. Only one
analyzer works on an InferenceService at a time: it holds the `coordination.k8s.io` Lease
`<name>-canary-analysis` (fineserve.core.lease), renews it each interval, and gives it back
however it ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from string import Template
from typing import TYPE_CHECKING, Any

from fineserve.core import rollout as rollout_ops
from fineserve.core.cluster import CONNECT_TIMEOUT, READ_TIMEOUT
from fineserve.core.errors import ClusterError, ParameterError
from fineserve.core.inference_service import Rollout, Track, read_rollout
from fineserve.core.lease import Lease

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fineserve.core.cluster import Cluster

LEASE_PURPOSE = "canary-analysis"
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
_ALL_REQUESTS = f"sum(increase(fineserve_requests_total{{{_REQUESTS}}}[$window]))"


def _answers(codes: str) -> str:
    """The answers with ``codes`` in the window; 0 when a side that answered had none of them.

    Counters of codes that never occurred do not exist, and `increase()` of nothing is no
    value at all: ``or`` the side's request count times 0 tells "none" from "not scraped". (A
    code's very first answers go uncounted until its new series has two samples in a window:
    `increase()` cannot see a series' first sample.)
    """
    selected = f'{_REQUESTS},code=~"{codes}",code!="499"'
    return f"sum(increase(fineserve_requests_total{{{selected}}}[$window])) or {_ALL_REQUESTS} * 0"


#: PromQL per check (`string.Template`: $model, $version, $window); `--query NAME=...` overrides.
QUERIES: dict[str, str] = {
    "requests": _ALL_REQUESTS,
    "errors": _answers(SERVER_ERRORS),
    "client_errors": _answers(CLIENT_ERRORS),
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
    max_client_error_rise: float = 0.05
    max_p99_seconds: float = 1.0
    max_p99_ratio: float = 1.5
    p99_margin_seconds: float = 0.025
    max_label_divergence: float = 0.1
    max_confidence_drop: float = 0.1

    def check(self) -> None:
        """A ParameterError naming the first threshold out of its range."""
        shares = ("min_success_rate", "max_success_drop", "max_client_error_rise")
        for name in (*shares, "max_label_divergence", "max_confidence_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParameterError(f"{name} must be within 0-1, got {getattr(self, name)}")
        for name in ("min_requests", "max_p99_seconds", "p99_margin_seconds"):
            if not getattr(self, name) >= 0:
                raise ParameterError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.max_p99_ratio >= 1:
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
    """One side's metrics over a window, as Prometheus gave them.

    None: Prometheus had no value; values may be NaN or ±Inf (each check says what that means
    for it). ``labels`` maps each predicted label to its count (empty: nothing predicted).
    """

    requests: float | None
    errors: float | None
    client_errors: float | None
    p99: float | None
    labels: dict[str, float]
    confidence: float | None


class Prometheus:
    """Instant queries against Prometheus' HTTP API."""

    def __init__(self, url: str, timeout: float = READ_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str, name: str = "") -> list[tuple[dict[str, str], float]]:
        """The instant vector (or scalar) of ``promql`` as (labels, value) pairs.

        ``name`` (the check's query) goes into the ClusterError of a query that fails: no
        answer within the timeout, a refusal, or an answer that is not an instant result.
        """
        import httpx

        what = f"the query {name!r} ({promql})" if name else f"the query {promql!r}"
        timeout = httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout))
        try:
            response = httpx.get(
                f"{self.url}/api/v1/query", params={"query": promql}, timeout=timeout
            )
        except httpx.ConnectTimeout as err:
            raise ClusterError(
                f"Prometheus at {self.url} did not accept a connection within "
                f"{timeout.connect:g}s for {what}"
            ) from err
        except httpx.TimeoutException as err:
            raise ClusterError(
                f"Prometheus at {self.url} did not answer {what} within {self.timeout:g}s"
            ) from err
        except httpx.HTTPError as err:
            raise ClusterError(f"cannot reach Prometheus at {self.url} for {what}: {err}") from err
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            error = body.get("error") if isinstance(body, dict) else None
            raise ClusterError(
                f"Prometheus at {self.url} refused {what}: HTTP {response.status_code}: "
                f"{error or response.text[:200]!r}"
            )
        try:
            if not isinstance(body, dict):
                raise ValueError(f"not a JSON object: {response.text[:200]!r}")
            return instant_result(body)
        except ValueError as err:
            raise ClusterError(
                f"Prometheus at {self.url} answered {what} with something that is not an "
                f"instant query result: {err}"
            ) from None


def instant_result(body: dict) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) pairs of an instant query's answer (Prometheus' HTTP API format).

    Values keep Prometheus' "NaN", "+Inf" and "-Inf". A ValueError says what is malformed.
    """
    if body.get("status") != "success":
        raise ValueError(f"status {body.get('status')!r}: {body.get('error') or 'no error given'}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise ValueError("no `data` object")
    if "result" not in data:
        raise ValueError("no `data.result`")
    kind, result = data.get("resultType"), data["result"]
    if kind == "scalar":
        return [({}, _sample_value(result))]
    if kind != "vector":
        raise ValueError(f"resultType {kind!r}, expected 'vector' or 'scalar'")
    if not isinstance(result, list):
        raise ValueError(f"`data.result` is {type(result).__name__}, not a list")
    pairs = []
    for item in result:
        labels = item.get("metric", {}) if isinstance(item, dict) else None
        if not isinstance(labels, dict):
            raise ValueError(f"a series without a `metric` object: {str(item)[:100]}")
        pairs.append((labels, _sample_value(item.get("value"))))
    return pairs


def _sample_value(sample: Any) -> float:
    """The value of a ``[timestamp, "value"]`` sample."""
    if not isinstance(sample, list) or len(sample) != 2:
        raise ValueError(f'a sample that is not [timestamp, "value"]: {str(sample)[:100]}')
    value = sample[1]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"the value {str(value)[:60]!r} is not a number")


def measure(
    prometheus: Prometheus, queries: Mapping[str, str], model: str, version: str, window: str
) -> Sample:
    """One side's metrics over the last ``window``."""

    def run(name: str) -> list[tuple[dict[str, str], float]]:
        promql = Template(queries[name]).substitute(model=model, version=version, window=window)
        return prometheus.query(promql, name)

    def scalar(name: str) -> float | None:
        found = run(name)
        return sum(value for _, value in found) if found else None  # NaN and ±Inf kept

    return Sample(
        requests=scalar("requests"),
        errors=scalar("errors"),
        client_errors=scalar("client_errors"),
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


class Verdict(str, Enum):
    """What a check, or a window of checks, concluded."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # too little or unreadable data: neither pass nor failure


PASS, FAIL, INCONCLUSIVE = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE
_SHOWN = {PASS: "pass", FAIL: "FAIL", INCONCLUSIVE: "inconclusive"}


@dataclass
class Check:
    """One rule applied to one window."""

    name: str
    verdict: Verdict
    value: float | None
    limit: str
    detail: str = ""

    def line(self) -> str:
        """The check as a report line."""
        value = "-" if self.value is None else f"{self.value:.4g}"
        return f"{self.name:<18}{_SHOWN[self.verdict]:<13}{value:<10} {self.limit}" + (
            f" ({self.detail})" if self.detail else ""
        )

    def as_dict(self) -> dict:
        """JSON-ready (a non-finite value as Prometheus writes it: "NaN", "+Inf", "-Inf")."""
        value = self.value
        if value is not None and not math.isfinite(value):
            value = _shown(value)
        return {"name": self.name, "verdict": self.verdict.value, "value": value,
                "limit": self.limit, "detail": self.detail}  # fmt: skip


def _shown(value: float | None) -> str:
    """A value as Prometheus writes it ("NaN", "+Inf"), or "missing" (no series)."""
    if value is None:
        return "missing"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.4g}"


def _count(value: float | None) -> float | None:
    """``value`` if it is a count (finite, not negative), else None."""
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _total(counts: Mapping[str, float]) -> float | None:
    """The sum of ``counts`` (0 for none), or None when one of them is not a count."""
    return None if any(_count(v) is None for v in counts.values()) else sum(counts.values())


def judge(canary: Sample, stable: Sample, thresholds: Thresholds) -> list[Check]:
    """The checks of one window; too little (or unreadable) traffic ends it inconclusive."""
    traffic = _traffic(canary, stable, thresholds)
    if traffic.verdict is not PASS:
        return [traffic]
    return [
        traffic,
        _success_rate(canary, stable, thresholds),
        _client_errors(canary, stable, thresholds),
        _p99(canary, stable, thresholds),
        _predictions(canary, stable),
        _label_divergence(canary, stable, thresholds),
        _confidence(canary, stable, thresholds),
    ]


def _traffic(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    short, unreadable = [], []
    for side, sample in (("canary", canary), ("stable", stable)):
        requests = _count(sample.requests)
        if requests is None:
            unreadable.append(f"{side} requests {_shown(sample.requests)}")
        elif requests < max(1, t.min_requests):
            short.append(f"{side} {requests:.0f}")
    detail = "; ".join(([f"too few: {', '.join(short)}"] if short else []) + unreadable)
    counts = [_count(canary.requests), _count(stable.requests)]
    value = None if None in counts else min(counts)
    verdict = INCONCLUSIVE if detail else PASS
    return Check("traffic", verdict, value, f">= {t.min_requests} requests each", detail)


def _share(count: float, requests: float) -> float:
    """``count`` of ``requests`` (the two queries' windows may differ by a scrape)."""
    return min(1.0, count / requests)


def _success_rate(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    name, limit = (
        "success rate",
        f">= {t.min_success_rate:g}, and stable's - {t.max_success_drop:g}",
    )
    if canary.errors == math.inf:
        return Check(name, FAIL, 0.0, limit, "canary server errors +Inf")
    errors = _count(canary.errors)
    if errors is None:
        return Check(
            name, INCONCLUSIVE, None, limit, f"canary server errors {_shown(canary.errors)}"
        )
    rate = 1 - _share(errors, canary.requests)
    if rate < t.min_success_rate:
        return Check(name, FAIL, rate, f">= {t.min_success_rate:g}")
    stable_errors = _count(stable.errors)
    if stable_errors is None:
        detail = f"stable server errors {_shown(stable.errors)}: nothing to compare with"
        return Check(name, INCONCLUSIVE, rate, limit, detail)
    stable_rate = 1 - _share(stable_errors, stable.requests)
    floor = max(t.min_success_rate, stable_rate - t.max_success_drop)
    return Check(
        name,
        PASS if rate >= floor else FAIL,
        rate,
        f">= {floor:.4g} (min {t.min_success_rate:g}, stable {stable_rate:.4g} - "
        f"{t.max_success_drop:g})",
    )


def _client_errors(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    name, limit = "client errors", f"<= stable's + {t.max_client_error_rise:g}"
    if canary.client_errors == math.inf:
        return Check(name, FAIL, 1.0, limit, "canary client errors +Inf")
    refused = _count(canary.client_errors)
    if refused is None:
        detail = f"canary client errors {_shown(canary.client_errors)}"
        return Check(name, INCONCLUSIVE, None, limit, detail)
    share = _share(refused, canary.requests)
    stable_refused = _count(stable.client_errors)
    if stable_refused is None:
        detail = f"stable client errors {_shown(stable.client_errors)}: nothing to compare with"
        return Check(name, INCONCLUSIVE, share, limit, detail)
    stable_share = _share(stable_refused, stable.requests)
    ceiling = stable_share + t.max_client_error_rise
    return Check(
        name,
        PASS if share <= ceiling else FAIL,
        share,
        f"<= {ceiling:.4g} (stable's share of 4xx {stable_share:.4g} + "
        f"{t.max_client_error_rise:g})",
    )


def _p99(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    name, limit = "p99 latency", f"<= {t.max_p99_seconds:g}s and stable's x {t.max_p99_ratio:g}"
    p99 = canary.p99
    if p99 == math.inf:
        return Check(name, FAIL, p99, limit, "canary p99 +Inf: beyond the largest histogram bucket")
    if p99 is None or math.isnan(p99) or p99 < 0:
        return Check(name, INCONCLUSIVE, None, limit, f"canary p99 {_shown(p99)}: no latency data")
    if p99 > t.max_p99_seconds:
        return Check(name, FAIL, p99, f"<= {t.max_p99_seconds:g}s")
    reference = stable.p99
    if reference is None or not math.isfinite(reference) or reference < 0:
        detail = f"stable p99 {_shown(reference)}: nothing to compare with"
        return Check(name, INCONCLUSIVE, p99, limit, detail)
    too_slow = p99 > reference * t.max_p99_ratio and p99 - reference > t.p99_margin_seconds
    return Check(
        name,
        FAIL if too_slow else PASS,
        p99,
        f"<= {t.max_p99_seconds:g}s and <= stable {reference:.4g}s x "
        f"{t.max_p99_ratio:g} (or + {t.p99_margin_seconds:g}s)",
    )


def _predictions(canary: Sample, stable: Sample) -> Check:
    name, limit = "predictions", "> 0 texts when stable predicts"
    predicted, reference = _total(canary.labels), _total(stable.labels)
    if predicted is None or reference is None:
        side, counts = ("canary", canary.labels) if predicted is None else ("stable", stable.labels)
        detail = f"{side} predictions {_distribution(counts)}: not counts"
        return Check(name, INCONCLUSIVE, None, limit, detail)
    if reference <= 0:
        return Check(name, INCONCLUSIVE, predicted, limit, "stable predicted nothing either")
    if predicted <= 0:
        detail = (
            f"{canary.requests:.0f} requests answered without a prediction; stable predicted "
            f"{reference:.0f} texts"
        )
        return Check(name, FAIL, predicted, limit, detail)
    return Check(name, PASS, predicted, limit, f"stable {reference:.0f}")


def _label_divergence(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    limit = f"<= {t.max_label_divergence:g} (Jensen-Shannon vs stable)"
    detail = _distribution(canary.labels) + " vs " + _distribution(stable.labels)
    predicted, reference = _total(canary.labels), _total(stable.labels)
    if not predicted or not reference:  # None (not counts) or 0 (nothing predicted)
        return Check("label divergence", INCONCLUSIVE, None, limit, detail)
    divergence = js_divergence(canary.labels, stable.labels)
    verdict = PASS if divergence <= t.max_label_divergence else FAIL
    return Check("label divergence", verdict, divergence, limit, detail)


def _confidence(canary: Sample, stable: Sample, t: Thresholds) -> Check:
    name, limit = "confidence", f">= stable's - {t.max_confidence_drop:g}"
    for side, value in (("canary", canary.confidence), ("stable", stable.confidence)):
        if value is None or not 0 <= value <= 1:  # NaN: 0/0, no probabilities in the window
            detail = f"{side} mean top probability {_shown(value)}: no probability data"
            return Check(name, INCONCLUSIVE, None, limit, detail)
    floor = stable.confidence - t.max_confidence_drop
    return Check(
        name,
        PASS if canary.confidence >= floor else FAIL,
        canary.confidence,
        f">= {floor:.4g} (stable mean top probability {stable.confidence:.4g} - "
        f"{t.max_confidence_drop:g})",
    )


def _distribution(counts: Mapping[str, float]) -> str:
    total = _total(counts)
    if total is None:
        return "{" + ", ".join(f"{k} {_shown(v)}" for k, v in sorted(counts.items())) + "}"
    if total <= 0:
        return "{}"
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items()) if v > 0)
    return "{" + shares + "}"


def verdict(checks: list[Check]) -> Verdict:
    """FAIL if a check failed, PASS if every check passed, else INCONCLUSIVE."""
    if any(c.verdict is FAIL for c in checks):
        return FAIL
    if checks and all(c.verdict is PASS for c in checks):
        return PASS
    return INCONCLUSIVE


def plan(steps: tuple[int, ...], current: int) -> list[int]:
    """The traffic steps still to take from ``current``: it first, then the steps above it."""
    return [current, *(s for s in steps if s > current)] if current < 100 else [100]


# ---------------------------------------------------------------------------- the lease


def analysis_lease(cluster: Cluster, name: str, ttl: float, **kwargs: Any) -> Lease:
    """The Lease that lets one analyzer at a time work on ``name`` (see fineserve.core.lease)."""
    return Lease(cluster, name, LEASE_PURPOSE, ttl, **kwargs)


# ---------------------------------------------------------------------------- the loop


@dataclass
class Interval:
    """One check: the traffic it was taken at, and its checks."""

    percent: int
    checks: list[Check]

    @property
    def verdict(self) -> Verdict:
        """See `verdict`."""
        return verdict(self.checks)

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {
            "percent": self.percent,
            "verdict": self.verdict.value,
            "checks": [c.as_dict() for c in self.checks],
        }


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
            "history": [i.as_dict() for i in self.history],
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
    """Step the canary of ``name`` up, check each interval, promote or roll back.

    The lease is given back however the analysis ends; an error that ends it (Prometheus or
    the Kubernetes API not answering, a malformed answer) is raised as a ClusterError.
    """
    settings.check()
    isvc = cluster.require(name)
    canary, stable = _tracks(read_rollout(isvc), name)
    lease = analysis_lease(cluster, name, ttl=settings.interval * 3 + 60)
    lease.acquire()
    history: list[Interval] = []
    try:
        try:
            run = _Run(cluster, name, prometheus, client, settings, lease, report, sleep)
            outcome = run.step_up(canary, stable, served_model_name(isvc), history)
        except KeyboardInterrupt:
            current = _current_percent(cluster, name)
            outcome = Outcome(
                "interrupted",
                f"interrupted: traffic left where it is (canary v{canary.version} at "
                f"{current}%); run analyze again to continue from there",
                history,
                read_rollout(cluster.require(name)),
            )
    except BaseException as err:
        unreleased = _release_after_error(lease)
        if unreleased and isinstance(err, ClusterError):
            raise ClusterError(f"{err}; {unreleased}") from err
        raise
    lease.release()
    return outcome


@dataclass
class _Run:
    """One analysis' collaborators (see `analyze`)."""

    cluster: Cluster
    name: str
    prometheus: Prometheus
    client: MlflowClient
    settings: Settings
    lease: Lease
    report: Callable[[str], None]
    sleep: Callable[[float], None]

    def step_up(self, canary: Track, stable: Track, model: str, history: list[Interval]):
        """Take the steps from the canary's traffic to 100; the outcome (``history`` filled)."""
        settings, cluster, name = self.settings, self.cluster, self.name
        failures = 0
        for percent in plan(settings.steps, canary.percent):
            if percent == 100:
                after = rollout_ops.promote(cluster, name, self.client)
                return Outcome(
                    "promoted",
                    f"v{canary.version} passed every check of every step and now serves all "
                    f"traffic; MLflow champion v{canary.version}, previous v{stable.version}",
                    history,
                    after,
                )
            if percent != _current_percent(cluster, name):
                rollout_ops.set_traffic(cluster, name, percent)
                self.report(f"traffic: canary v{canary.version} at {percent}%")
            inconclusive = 0
            while True:
                interval = self.check(percent, model, canary, stable)
                history.append(interval)
                self.report(_interval_report(interval, len(history)))
                if interval.verdict is PASS:
                    break
                if interval.verdict is INCONCLUSIVE:
                    inconclusive += 1
                    if inconclusive >= settings.max_inconclusive:
                        return self.stop_inconclusive(interval, inconclusive, history)
                    continue
                failures += 1
                if failures >= settings.threshold:
                    after = rollout_ops.rollback(cluster, name)
                    failed = {c.name for i in history for c in i.checks if c.verdict is FAIL}
                    return Outcome(
                        "rolled-back",
                        f"v{canary.version} failed {failures} checks (threshold "
                        f"{settings.threshold}): {', '.join(sorted(failed))}; all traffic is "
                        f"back on v{stable.version}, MLflow champion unchanged",
                        history,
                        after,
                    )
        raise AssertionError("the plan always ends at 100")  # pragma: no cover

    def check(self, percent: int, model: str, canary: Track, stable: Track) -> Interval:
        """Hold the step one interval (renewing the lease), then judge the window."""
        self.sleep(self.settings.interval)
        self.lease.acquire()  # renew
        window = f"{max(1, round(self.settings.interval))}s"
        queries = self.settings.queries
        checks = judge(
            measure(self.prometheus, queries, model, canary.version, window),
            measure(self.prometheus, queries, model, stable.version, window),
            self.settings.thresholds,
        )
        return Interval(percent, checks)

    def stop_inconclusive(self, interval: Interval, count: int, history: list[Interval]):
        """The outcome after ``count`` inconclusive checks in a row (the traffic stays)."""
        undecided = [c.name for c in interval.checks if c.verdict is INCONCLUSIVE]
        return Outcome(
            "inconclusive",
            f"{count} checks in a row at {interval.percent}% were inconclusive (last: "
            f"{', '.join(undecided)}); traffic left at {interval.percent}% (send traffic or "
            "loosen --min-requests if it was too little, see the checks' details otherwise, "
            "and run analyze again to continue)",
            history,
            read_rollout(self.cluster.require(self.name)),
        )


def _release_after_error(lease: Lease) -> str:
    """Give the lease up after an error; what to do when that fails too ("" when released)."""
    try:
        lease.release()
    except ClusterError as failed:
        until = time.strftime("%H:%M:%S", time.localtime(lease.expires))
        return (
            f"the lease could not be given back either ({failed}); it expires at {until}, or "
            f"delete the {lease.describe()}"
        )
    return ""


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


def _interval_report(interval: Interval, number: int) -> str:
    shown = {PASS: "passed", FAIL: "FAILED", INCONCLUSIVE: "inconclusive"}[interval.verdict]
    lines = [f"check {number} at {interval.percent}%: {shown}"]
    lines += [f"  {check.line()}" for check in interval.checks]
    return "\n".join(lines)


def render(outcome: Outcome) -> str:
    """The final report: every failed check with its value and threshold, and the result.

    An inconclusive end also lists the last window's inconclusive checks with their reasons.
    """
    failed = [(i, c) for i in outcome.history for c in i.checks if c.verdict is FAIL]
    lines = [f"analysis {outcome.result}: {outcome.message}"]
    if failed:
        lines.append("failed checks:")
        lines += [f"  at {i.percent}%: {c.line()}" for i, c in failed]
    if outcome.result == "inconclusive" and outcome.history:
        last = outcome.history[-1]
        lines.append("inconclusive checks of the last window:")
        lines += [
            f"  at {last.percent}%: {c.line()}" for c in last.checks if c.verdict is INCONCLUSIVE
        ]
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
