"""The canary analysis' decision rules: checks, inconclusive windows, counting, resuming, lease.

Prometheus is scripted here (the e2e test uses a real one); the cluster is the fake API server
with the emulated KServe controller.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from string import Template

import mlflow
import pytest
from scripted_prometheus import LABELS, PrometheusOverHTTP, ScriptedPrometheus, sample, vector
from silent_server import SilentServer

from fineserve.components.deploy import rollout_version
from fineserve.core import canary_analysis as analysis
from fineserve.core import rollout
from fineserve.core.artifacts import CHAMPION, TAG_STORAGE_URI
from fineserve.core.canary_analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Check,
    Sample,
    Settings,
    Thresholds,
    judge,
)
from fineserve.core.cluster import Cluster
from fineserve.core.errors import ClusterError, ParameterError
from fineserve.core.inference_service import PredictorSettings, read_rollout
from fineserve.core.lease import Lease

MODEL, ISVC = "clf", "fineserve"
LEASE_NAME = f"{ISVC}-canary-analysis"


GOOD, LOW, BAD = sample(), sample(requests=3), sample(errors=20)


def names(checks: list[Check], verdict) -> set[str]:
    return {c.name for c in checks if c.verdict is verdict}


# ------------------------------------------------------------------------------ the checks


def test_a_canary_like_stable_passes_every_check():
    checks = judge(GOOD, GOOD, Thresholds())
    assert all(c.verdict is PASS for c in checks), [c.line() for c in checks]
    assert analysis.verdict(checks) is PASS
    assert [c.name for c in checks] == [
        "traffic", "success rate", "client errors", "p99 latency", "predictions",
        "label divergence", "confidence",
    ]  # fmt: skip


def test_too_little_traffic_on_either_side_is_inconclusive_not_a_pass():
    for canary, stable in ((LOW, GOOD), (GOOD, LOW), (sample(requests=0), GOOD)):
        checks = judge(canary, stable, Thresholds(min_requests=50))
        assert analysis.verdict(checks) is INCONCLUSIVE
        assert [c.name for c in checks] == ["traffic"] and "too few" in checks[0].detail


def test_success_rate_against_the_absolute_floor_and_against_stable():
    assert names(judge(sample(errors=2), GOOD, Thresholds()), FAIL) == {"success rate"}
    # stable itself at 90%: the canary may not be more than max_success_drop below it
    stable = sample(errors=10)
    t = Thresholds(min_success_rate=0.8)
    assert analysis.verdict(judge(sample(errors=10.5), stable, t)) is PASS
    assert names(judge(sample(errors=12), stable, t), FAIL) == {"success rate"}


def test_p99_fails_above_the_limit_or_above_stable_by_both_ratio_and_margin():
    t = Thresholds(max_p99_seconds=1.0, max_p99_ratio=1.5, p99_margin_seconds=0.025)
    assert names(judge(sample(p99=1.2), sample(p99=1.1), t), FAIL) == {"p99 latency"}
    assert names(judge(sample(p99=0.3), sample(p99=0.1), t), FAIL) == {"p99 latency"}
    # 2x stable but within the margin (bucket noise on a fast model): a pass
    assert analysis.verdict(judge(sample(p99=0.02), sample(p99=0.01), t)) is PASS


def test_one_class_for_everything_fails_the_label_divergence():
    one_class = sample(labels={"negative": 100.0}, confidence=0.99)
    checks = judge(one_class, GOOD, Thresholds())
    assert names(checks, FAIL) == {"label divergence"}
    divergence = next(c for c in checks if c.name == "label divergence")
    assert divergence.value == pytest.approx(analysis.js_divergence({"negative": 1}, LABELS))
    assert divergence.value > 0.4
    assert "{negative 100%}" in divergence.detail


def test_collapsed_confidence_fails():
    assert names(judge(sample(confidence=0.4), GOOD, Thresholds()), FAIL) == {"confidence"}


def test_a_canary_answering_without_predicting_fails_while_stable_predicts():
    for nothing in ({}, {"negative": 0.0, "neutral": 0.0, "positive": 0.0}):
        checks = judge(sample(labels=nothing, confidence=math.nan), GOOD, Thresholds())
        assert analysis.verdict(checks) is FAIL
        assert names(checks, FAIL) == {"predictions"}
        predictions = next(c for c in checks if c.name == "predictions")
        assert "100 requests answered without a prediction; stable predicted 100" in (
            predictions.detail
        )
        assert names(checks, INCONCLUSIVE) == {"label divergence", "confidence"}
    # neither side predicted: nothing to judge the canary against, but no pass either
    idle = sample(labels={}, confidence=math.nan)
    assert analysis.verdict(judge(idle, idle, Thresholds())) is INCONCLUSIVE


def test_a_jump_in_the_share_of_refused_requests_fails_the_client_error_check():
    t = Thresholds(max_client_error_rise=0.05)
    checks = judge(sample(client_errors=100), GOOD, t)
    assert names(checks, FAIL) == {"client errors"}
    assert next(c for c in checks if c.name == "client errors").value == 1.0
    assert names(judge(sample(client_errors=6), GOOD, t), FAIL) == {"client errors"}
    assert analysis.verdict(judge(sample(client_errors=4), GOOD, t)) is PASS
    # the same clients send the same bad requests to both sides: stable's share is the base
    assert analysis.verdict(judge(sample(client_errors=22), sample(client_errors=20), t)) is PASS


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("field", "value", "canary_verdict", "check"),
    [
        ("requests", NAN, INCONCLUSIVE, "traffic"),
        ("requests", INF, INCONCLUSIVE, "traffic"),
        ("requests", None, INCONCLUSIVE, "traffic"),
        ("errors", NAN, INCONCLUSIVE, "success rate"),
        ("errors", INF, FAIL, "success rate"),  # unbounded server errors
        ("errors", -INF, INCONCLUSIVE, "success rate"),
        ("errors", None, INCONCLUSIVE, "success rate"),
        ("client_errors", NAN, INCONCLUSIVE, "client errors"),
        ("client_errors", INF, FAIL, "client errors"),
        ("client_errors", None, INCONCLUSIVE, "client errors"),
        ("p99", NAN, INCONCLUSIVE, "p99 latency"),  # histogram_quantile of no requests: 0/0
        ("p99", INF, FAIL, "p99 latency"),  # beyond the largest bucket
        ("p99", -INF, INCONCLUSIVE, "p99 latency"),
        ("p99", None, INCONCLUSIVE, "p99 latency"),
        ("labels", {"negative": NAN, "positive": 10.0}, INCONCLUSIVE, "predictions"),
        ("labels", {"negative": INF}, INCONCLUSIVE, "predictions"),
        ("confidence", NAN, INCONCLUSIVE, "confidence"),  # sum / count of nothing: 0/0
        ("confidence", INF, INCONCLUSIVE, "confidence"),
        ("confidence", None, INCONCLUSIVE, "confidence"),
    ],
)
def test_a_value_that_is_not_a_number_or_missing_never_passes(field, value, canary_verdict, check):
    odd = sample(**{field: value})
    for side, (canary, stable) in (("canary", (odd, GOOD)), ("stable", (GOOD, odd))):
        checks = judge(canary, stable, Thresholds())
        judged = next(c for c in checks if c.name == check)
        assert judged.verdict is (canary_verdict if side == "canary" else INCONCLUSIVE), (
            side,
            judged.line(),
        )
        assert analysis.verdict(checks) is not PASS
        assert side in judged.detail, judged.line()


def test_inconclusive_checks_never_promote(canary, registry):
    # plenty of traffic, but the canary's latency histogram gives NaN in every window
    outcome, seen = run(canary, registry, [sample(p99=NAN)] * 3, max_inconclusive=3)
    assert outcome.result == "inconclusive", seen
    assert "were inconclusive (last: p99 latency)" in outcome.message
    assert canary_percent(canary) == 10
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1
    assert "canary p99 NaN: no latency data" in analysis.render(outcome)


def test_jensen_shannon_divergence_is_zero_for_the_same_shares_and_one_for_disjoint_labels():
    assert analysis.js_divergence({"a": 1, "b": 3}, {"a": 10, "b": 30}) == pytest.approx(0)
    assert analysis.js_divergence({"a": 5}, {"b": 7}) == pytest.approx(1)
    assert 0 < analysis.js_divergence({"a": 1, "b": 1}, {"a": 1, "b": 3}) < 0.1


def test_the_plan_continues_from_the_traffic_found():
    assert analysis.plan((10, 25, 50, 100), 10) == [10, 25, 50, 100]
    assert analysis.plan((10, 25, 50, 100), 30) == [30, 50, 100]
    assert analysis.plan((10, 25, 50, 100), 5) == [5, 10, 25, 50, 100]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(steps=(10, 50)), "end at 100"),
        (Settings(steps=(50, 25, 100)), "rise strictly"),
        (Settings(steps=(0, 100)), "within 1-100"),
        (Settings(interval=0), "interval must be positive"),
        (Settings(threshold=0), "threshold and max_inconclusive"),
        (Settings(queries={**analysis.QUERIES, "latency": "x"}), "unknown queries ['latency']"),
        (Settings(queries={**analysis.QUERIES, "p99": "up{a=$nope}"}), "query 'p99'"),
        (Settings(thresholds=Thresholds(min_success_rate=1.5)), "min_success_rate"),
        (Settings(thresholds=Thresholds(max_p99_ratio=0.5)), "max_p99_ratio"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        settings.check()


# ------------------------------------------------------------------------------ the loop


@pytest.fixture
def cluster(fake_kube, kserve_controller, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(fake_kube.kubeconfig(tmp_path / "kubeconfig")))
    return Cluster(context="fake", namespace="fineserve")


@pytest.fixture
def registry(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(MODEL)
    for version in (1, 2):
        client.create_model_version(
            MODEL, f"s3://m/v{version}", tags={TAG_STORAGE_URI: f"s3://m/v{version}"}
        )
    return client


@pytest.fixture
def canary(cluster, registry):
    """v1 serving, v2 a 10% canary (Serverless)."""
    for version in ("1", "2"):
        settings = PredictorSettings(
            image="img", storage_uri=f"s3://m/v{version}", model_version=version
        )
        rollout_version(
            cluster, registry, name=ISVC, model_name=MODEL, mode="Serverless",
            settings=settings, canary_percent=10, timeout=5, interval=0.05,
        )  # fmt: skip
    return cluster


def run(cluster, registry, windows, **settings):
    prometheus = ScriptedPrometheus([{"2": w} if isinstance(w, Sample) else w for w in windows])
    settings = Settings(**{"interval": 60.0, **settings})
    seen: list[str] = []
    outcome = analysis.analyze(
        cluster, ISVC, prometheus, registry, settings, report=seen.append, sleep=prometheus.advance
    )
    return outcome, seen


def canary_percent(cluster) -> int | None:
    state = read_rollout(cluster.require(ISVC))
    return state.canary.percent if state.canary else None


def test_inconclusive_windows_hold_the_step_and_count_as_no_failure(canary, registry):
    outcome, seen = run(canary, registry, [LOW, LOW, GOOD, LOW, GOOD, GOOD], threshold=1)
    assert outcome.result == "promoted", seen
    assert [(i.percent, i.verdict) for i in outcome.history] == [
        (10, INCONCLUSIVE), (10, INCONCLUSIVE), (10, PASS), (25, INCONCLUSIVE), (25, PASS),
        (50, PASS),
    ]  # fmt: skip
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 2


def test_failed_checks_count_in_all_not_in_a_row(canary, registry):
    # one failure, then passes: below the threshold of 2, so the canary goes on
    outcome, _ = run(canary, registry, [BAD, GOOD, GOOD, GOOD], threshold=2)
    assert outcome.result == "promoted"


def test_the_threshold_th_failure_rolls_back_and_leaves_champion(canary, registry):
    outcome, seen = run(canary, registry, [BAD, GOOD, BAD], threshold=2)
    assert outcome.result == "rolled-back", seen
    assert [i.percent for i in outcome.history] == [10, 10, 25]
    assert canary_percent(canary) == 0 and read_rollout(canary.require(ISVC)).served_version == "1"
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1
    report = analysis.render(outcome)
    assert "failed 2 checks (threshold 2): success rate" in report
    assert report.count("success rate      FAIL") == 2 and ">= 0.99" in report


def test_too_many_inconclusive_checks_stop_with_the_traffic_left_where_it_is(canary, registry):
    outcome, _ = run(canary, registry, [GOOD, LOW, LOW, LOW], max_inconclusive=3)
    assert outcome.result == "inconclusive" and "traffic left at 25%" in outcome.message
    assert canary_percent(canary) == 25
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1


def test_a_second_analysis_continues_from_the_traffic_it_finds(canary, registry):
    rollout.set_traffic(canary, ISVC, 30)  # a first analyzer (or a person) left it at 30%
    outcome, _ = run(canary, registry, [GOOD, GOOD])
    assert outcome.result == "promoted"
    assert [i.percent for i in outcome.history] == [30, 50]


def test_ctrl_c_leaves_the_traffic_where_it_is_and_gives_the_lease_back(canary, registry):
    outcome, _ = run(canary, registry, [GOOD, KeyboardInterrupt()])
    assert outcome.result == "interrupted"
    assert "traffic left where it is (canary v2 at 25%)" in outcome.message
    assert canary_percent(canary) == 25
    assert _lease_of(canary) is None


def test_no_canary_in_flight_is_refused(cluster, registry):
    settings = PredictorSettings(image="img", storage_uri="s3://m/v1", model_version="1")
    rollout_version(
        cluster, registry, name=ISVC, model_name=MODEL, mode="Serverless", settings=settings,
        canary_percent=10, timeout=5, interval=0.05,
    )  # fmt: skip
    with pytest.raises(ClusterError, match="no canary in flight, nothing to analyze"):
        run(cluster, registry, [GOOD])


# ------------------------------------------------------------------------------ the lease


def _lease(cluster, holder: str, **kwargs) -> Lease:
    return analysis.analysis_lease(cluster, ISVC, ttl=600, holder=holder, **kwargs)


def _lease_of(cluster) -> tuple[str, float] | None:
    """Who holds the analysis' Lease and until when; None: nobody."""
    return _lease(cluster, "reader").holder_now()


def _lease_object(fake_kube) -> dict:
    return fake_kube.get("coordination.k8s.io", "v1", "leases", "fineserve", LEASE_NAME)


def test_a_live_lease_of_another_analyzer_is_respected_and_nothing_changes(
    canary, registry, fake_kube
):
    _lease(canary, "ci-runner/42").acquire()
    before, lease_before = canary.require(ISVC), _lease_object(fake_kube)
    with pytest.raises(ClusterError) as refused:
        run(canary, registry, [GOOD, GOOD, GOOD])
    message = str(refused.value)
    assert "ci-runner/42 holds the canary-analysis lease until" in message
    assert f"kubectl -n fineserve delete lease {LEASE_NAME}" in message
    after = canary.require(ISVC)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert _lease_object(fake_kube) == lease_before


def test_an_expired_lease_is_taken_over_and_ours_is_renewed_each_interval(
    canary, registry, fake_kube
):
    dead = _lease(canary, "gone/1", clock=lambda: time.time() - 3600)
    dead.acquire()  # expired an hour ago... as far as everyone else's clock goes
    annotations = canary.require(ISVC)["metadata"].get("annotations")
    expiries: list[float] = []
    prometheus = ScriptedPrometheus([{"2": GOOD}] * 3)

    def sleep(seconds: float) -> None:
        prometheus.advance(seconds)
        holder, until = _lease_of(canary)
        assert holder != "gone/1"
        expiries.append(until)
        # the lease is not on the InferenceService: its annotations reach the pod templates
        assert canary.require(ISVC)["metadata"].get("annotations") == annotations

    outcome = analysis.analyze(
        canary, ISVC, prometheus, registry, Settings(interval=60.0), report=lambda _: None,
        sleep=sleep,
    )  # fmt: skip
    assert outcome.result == "promoted"
    assert expiries == sorted(expiries) and len(set(expiries)) == 3  # renewed every interval
    assert _lease_of(canary) is None  # released at the end
    spec = _lease_object(fake_kube)["spec"]
    assert spec["holderIdentity"] == "" and spec["leaseTransitions"] == 1  # taken over once


def test_the_lease_belongs_to_the_inference_service(canary, fake_kube):
    _lease(canary, "a").acquire()
    (owner,) = _lease_object(fake_kube)["metadata"]["ownerReferences"]
    isvc = canary.require(ISVC)
    assert (owner["apiVersion"], owner["kind"]) == (isvc["apiVersion"], isvc["kind"])
    assert (owner["name"], owner["uid"]) == (ISVC, isvc["metadata"]["uid"])


def test_two_analyzers_racing_for_the_lease_one_wins(canary):
    first, second = _lease(canary, "a"), _lease(canary, "b")
    first.acquire()
    with pytest.raises(ClusterError, match="a holds the canary-analysis lease"):
        second.acquire()
    first.release()
    second.acquire()
    assert _lease_of(canary)[0] == "b"


def test_a_lease_call_the_api_never_answers_ends_with_a_message(tmp_path):
    """Every Lease request has the Cluster's timeouts (a hung API ends the command)."""
    from test_timeouts import _kubeconfig

    with SilentServer() as silent:
        server = f"http://127.0.0.1:{silent.port}"
        path = _kubeconfig(tmp_path / "kubeconfig", server)
        hung = Cluster(context="hung", config_file=str(path), timeout=1)
        started = time.monotonic()
        with pytest.raises(ClusterError) as failed:
            _lease(hung, "a").acquire()
    assert time.monotonic() - started < 15
    assert str(failed.value) == (
        f"the Kubernetes API at {server} did not answer within 1s (2 tries) to get "
        f"Lease {LEASE_NAME!r} in namespace 'ns'"
    )


@pytest.mark.parametrize("existing", [None, "gone/1"], ids=["no-lease-yet", "expired-lease"])
def test_a_lease_taken_between_our_read_and_our_write_is_not_overwritten(
    canary, monkeypatch, existing
):
    if existing:
        _lease(canary, existing, clock=lambda: time.time() - 3600).acquire()
    mine, theirs = _lease(canary, "mine"), _lease(canary, "theirs")
    unpatched = Lease._request
    raced: list[str] = []

    def racing(self, verb, *args):
        if self is mine and verb in ("create", "replace") and not raced:
            raced.append(verb)
            theirs.acquire()  # gets in first: our write carries a stale view (409)
        return unpatched(self, verb, *args)

    monkeypatch.setattr(Lease, "_request", racing)
    with pytest.raises(ClusterError, match="theirs holds the canary-analysis lease"):
        mine.acquire()
    assert raced == ["replace" if existing else "create"]
    assert _lease_of(canary)[0] == "theirs"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "10,abc"], "steps must be comma-separated integers, got '10,abc'"),
        (["--steps", "10,50"], "steps must rise strictly and end at 100"),
        (["--query", "p99"], "--query expects NAME=PROMQL, got 'p99'"),
        (["--max-label-divergence", "2"], "max_label_divergence must be within 0-1"),
    ],
)
def test_the_cli_refuses_bad_settings_before_it_reaches_a_cluster(args, message, capsys):
    from fineserve.cli import main

    with pytest.raises(SystemExit) as exited:
        # no kubeconfig context "nowhere" exists: reaching for the cluster would fail otherwise
        main(["rollout", "analyze", ISVC, "--context", "nowhere", "--prometheus-url", "x", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_pipeline_step_refuses_to_run_without_a_prometheus_url(tmp_path):
    from fineserve.components.canary_analysis import analyze_canary
    from fineserve.components.decorator import call_component

    with pytest.raises(ParameterError, match="prometheus_url is empty"):
        call_component(analyze_canary, report=str(tmp_path / "report.md"), kube_context="x")
    with pytest.raises(ParameterError, match="steps must rise strictly"):
        call_component(analyze_canary, report=str(tmp_path / "r.md"), analysis_steps="50,10,100")


# ------------------------------------------------------------------- Prometheus over HTTP

HEALTHY = {"requests": "100", "errors": "0", "client_errors": "0", "p99": "0.05"}


def answers(odd: dict[str, bytes | None]) -> Callable[[str], tuple[int, bytes]]:
    """A healthy Prometheus, but for the canary's (v2) queries named in ``odd``.

    A query maps to its raw answer body, or None for an empty result (no series).
    """

    def answer(promql: str) -> tuple[int, bytes]:
        model = re.search(r'model_name="([^"]+)"', promql).group(1)
        version = re.search(r'model_version="([^"]+)"', promql).group(1)
        window = re.search(r"\[(\w+)\]", promql).group(1)
        name = next(
            n
            for n, template in analysis.QUERIES.items()
            if Template(template).substitute(model=model, version=version, window=window) == promql
        )
        if version == "2" and name in odd:
            return 200, odd[name] if odd[name] is not None else vector_of([])
        if name == "labels":
            return 200, vector_of([({"label": k}, str(v)) for k, v in LABELS.items()])
        return 200, vector(HEALTHY.get(name, "0.8"))

    return answer


def vector_of(series: list[tuple[dict, str]]) -> bytes:
    result = [{"metric": labels, "value": [1700000000.0, value]} for labels, value in series]
    data = {"resultType": "vector", "result": result}
    return json.dumps({"status": "success", "data": data}).encode()


def analyze_over_http(cluster, registry, answer, **settings):
    with PrometheusOverHTTP(answer) as prometheus:
        seen: list[str] = []
        outcome = analysis.analyze(
            cluster, ISVC, analysis.Prometheus(prometheus.url), registry,
            Settings(**{"interval": 60.0, "max_inconclusive": 2, **settings}),
            report=seen.append, sleep=lambda seconds: None,
        )  # fmt: skip
    return outcome, seen


def test_prometheus_nan_or_nothing_holds_the_step_and_never_promotes(canary, registry):
    for query, body in (
        ("p99", vector("NaN")),  # histogram_quantile with no requests in the window
        ("p99", None),  # no series at all
        ("errors", vector("NaN")),
        ("client_errors", vector("-Inf")),
        ("confidence", vector("NaN")),  # 0/0: no probabilities in the window
    ):
        outcome, seen = analyze_over_http(canary, registry, answers({query: body}))
        assert outcome.result == "inconclusive", (query, body, "\n".join(seen))
        assert [i.verdict for i in outcome.history] == [INCONCLUSIVE, INCONCLUSIVE]
        assert canary_percent(canary) == 10 and _lease_of(canary) is None
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1


@pytest.mark.parametrize("query", ["p99", "errors"])
def test_prometheus_inf_fails_the_check_and_rolls_back(canary, registry, query):
    outcome, seen = analyze_over_http(canary, registry, answers({query: vector("+Inf")}))
    assert outcome.result == "rolled-back", "\n".join(seen)
    dumped = json.loads(json.dumps(outcome.as_dict(), allow_nan=False))  # -o json: strict JSON
    assert dumped["history"][0]["verdict"] == "fail"
    if query == "p99":
        assert {"name": "p99 latency", "verdict": "fail", "value": "+Inf"}.items() <= (
            dumped["history"][0]["checks"][3].items()
        )
    assert canary_percent(canary) == 0 and _lease_of(canary) is None
    assert read_rollout(canary.require(ISVC)).served_version == "1"
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1


MALFORMED = [
    (b'{"status": "success"}', "no `data` object"),
    (b'{"status": "success", "data": {"resultType": "vector"}}', "no `data.result`"),
    (vector("fast"), "the value 'fast' is not a number"),
    (b"<html>502 Bad Gateway</html>", "not a JSON object: '<html>502 Bad Gateway</html>'"),
    (
        b'{"status": "success", "data": {"resultType": "matrix", "result": []}}',
        "resultType 'matrix', expected 'vector' or 'scalar'",
    ),
    (b'{"status": "success", "data": {"resultType": "vector", "result": [{}]}}', "a sample"),
    (b"[1, 2]", "not a JSON object"),
]


def test_a_malformed_prometheus_answer_is_an_error_naming_the_query_and_the_lease_is_released(
    canary, registry
):
    for body, problem in MALFORMED:
        with pytest.raises(ClusterError) as failed:
            analyze_over_http(canary, registry, answers({"p99": body}))
        message = str(failed.value)
        assert "answered the query 'p99' (histogram_quantile(0.99" in message, message
        assert problem in message, message
        assert _lease_of(canary) is None
        assert canary_percent(canary) == 10


def _cli_analyze(tmp_path, prometheus_url: str, *args: str) -> int:
    from fineserve.cli import main

    with pytest.raises(SystemExit) as exited:
        main([
            "rollout", "analyze", ISVC, "--context", "fake", "-n", "fineserve",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--prometheus-url",
            prometheus_url, "--interval", "0.1", *args,
        ])  # fmt: skip
    return exited.value.code


def test_the_cli_ends_with_a_message_when_prometheus_answers_garbage_or_never_answers(
    canary, registry, tmp_path, capsys
):
    with PrometheusOverHTTP(answers({"requests": b"<html>oops</html>"})) as prometheus:
        code = _cli_analyze(tmp_path, prometheus.url)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"fineserve rollout: Prometheus at {prometheus.url} answered the query 'requests'" in err
    assert "not a JSON object: '<html>oops</html>'" in err
    assert _lease_of(canary) is None and canary_percent(canary) == 10

    with SilentServer() as silent:
        started = time.monotonic()
        code = _cli_analyze(tmp_path, f"http://127.0.0.1:{silent.port}", "--request-timeout", "1")
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and took < 20, took
    assert (
        f"Prometheus at http://127.0.0.1:{silent.port} did not answer the query 'requests'" in err
    )
    assert "within 1s" in err and "Traceback" not in err
    assert _lease_of(canary) is None and canary_percent(canary) == 10
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 1


def test_an_error_the_lease_cannot_be_given_back_after_says_both(canary, registry, monkeypatch):
    def unreachable(self):
        raise ClusterError("the Kubernetes API did not answer")

    monkeypatch.setattr(analysis.Lease, "release", unreachable)
    with pytest.raises(ClusterError) as failed:
        analyze_over_http(canary, registry, answers({"p99": b"{}"}))
    message = str(failed.value)
    assert "answered the query 'p99'" in message  # the error that ended it comes first
    assert "the lease could not be given back either (the Kubernetes API did not answer)" in (
        message
    )
    assert "it expires at" in message and f"delete the Lease {LEASE_NAME!r}" in message
