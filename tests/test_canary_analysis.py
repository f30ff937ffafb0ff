"""The canary analysis' decision rules: checks, inconclusive windows, counting, resuming, lease.

Prometheus is scripted here (the e2e test uses a real one); the cluster is the fake API server
with the emulated KServe controller.
"""

from __future__ import annotations

import json
import re
import time

import mlflow
import pytest
from scripted_prometheus import LABELS, ScriptedPrometheus, sample

from fineserve.components.deploy import rollout_version
from fineserve.core import canary_analysis as analysis
from fineserve.core import rollout
from fineserve.core.artifacts import CHAMPION, TAG_STORAGE_URI
from fineserve.core.canary_analysis import Check, Sample, Settings, Thresholds, judge
from fineserve.core.cluster import Cluster
from fineserve.core.errors import ClusterError, ParameterError
from fineserve.core.inference_service import PredictorSettings, read_rollout

MODEL, ISVC = "clf", "fineserve"


GOOD, LOW, BAD = sample(), sample(requests=3), sample(errors=20)


def names(checks: list[Check], passed) -> set[str]:
    return {c.name for c in checks if c.passed is passed}


# ------------------------------------------------------------------------------ the checks


def test_a_canary_like_stable_passes_every_check():
    checks = judge(GOOD, GOOD, Thresholds())
    assert all(c.passed for c in checks), [c.line() for c in checks]
    assert [c.name for c in checks] == [
        "traffic", "success rate", "p99 latency", "label divergence", "confidence",
    ]  # fmt: skip


def test_too_little_traffic_on_either_side_is_inconclusive_not_a_pass():
    for canary, stable in ((LOW, GOOD), (GOOD, LOW), (sample(requests=0), GOOD)):
        checks = judge(canary, stable, Thresholds(min_requests=50))
        assert analysis.verdict(checks) is None
        assert [c.name for c in checks] == ["traffic"] and "too few" in checks[0].detail


def test_success_rate_against_the_absolute_floor_and_against_stable():
    assert names(judge(sample(errors=2), GOOD, Thresholds()), False) == {"success rate"}
    # stable itself at 90%: the canary may not be more than max_success_drop below it
    stable = sample(errors=10)
    t = Thresholds(min_success_rate=0.8)
    assert analysis.verdict(judge(sample(errors=10.5), stable, t)) is True
    assert names(judge(sample(errors=12), stable, t), False) == {"success rate"}


def test_p99_fails_above_the_limit_or_above_stable_by_both_ratio_and_margin():
    t = Thresholds(max_p99_seconds=1.0, max_p99_ratio=1.5, p99_margin_seconds=0.025)
    assert names(judge(sample(p99=1.2), sample(p99=1.1), t), False) == {"p99 latency"}
    assert names(judge(sample(p99=0.3), sample(p99=0.1), t), False) == {"p99 latency"}
    # 2x stable but within the margin (bucket noise on a fast model): a pass
    assert analysis.verdict(judge(sample(p99=0.02), sample(p99=0.01), t)) is True


def test_one_class_for_everything_fails_the_label_divergence():
    one_class = sample(labels={"negative": 100.0}, confidence=0.99)
    checks = judge(one_class, GOOD, Thresholds())
    assert names(checks, False) == {"label divergence"}
    divergence = next(c for c in checks if c.name == "label divergence")
    assert divergence.value == pytest.approx(analysis.js_divergence({"negative": 1}, LABELS))
    assert divergence.value > 0.4
    assert "{negative 100%}" in divergence.detail


def test_collapsed_confidence_fails():
    assert names(judge(sample(confidence=0.4), GOOD, Thresholds()), False) == {"confidence"}


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
        (10, None), (10, None), (10, True), (25, None), (25, True), (50, True),
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
    annotations = canary.require(ISVC)["metadata"].get("annotations") or {}
    assert analysis.LEASE_ANNOTATION not in annotations


def test_no_canary_in_flight_is_refused(cluster, registry):
    settings = PredictorSettings(image="img", storage_uri="s3://m/v1", model_version="1")
    rollout_version(
        cluster, registry, name=ISVC, model_name=MODEL, mode="Serverless", settings=settings,
        canary_percent=10, timeout=5, interval=0.05,
    )  # fmt: skip
    with pytest.raises(ClusterError, match="no canary in flight, nothing to analyze"):
        run(cluster, registry, [GOOD])


# ------------------------------------------------------------------------------ the lease


def _lease_of(cluster) -> dict | None:
    raw = (cluster.require(ISVC)["metadata"].get("annotations") or {}).get(
        analysis.LEASE_ANNOTATION
    )
    return json.loads(raw) if raw else None


def test_a_live_lease_of_another_analyzer_is_respected_and_nothing_changes(canary, registry):
    other = analysis.Lease(canary, ISVC, ttl=600, owner="ci-runner/42")
    other.acquire()
    before = canary.require(ISVC)
    with pytest.raises(ClusterError, match="being analyzed by ci-runner/42"):
        run(canary, registry, [GOOD, GOOD, GOOD])
    after = canary.require(ISVC)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_an_expired_lease_is_taken_over_and_ours_is_renewed_each_interval(canary, registry):
    dead = analysis.Lease(canary, ISVC, ttl=600, owner="gone/1", clock=lambda: time.time() - 3600)
    dead.acquire()  # expired an hour ago... as far as everyone else's clock goes
    expiries: list[float] = []
    prometheus = ScriptedPrometheus([{"2": GOOD}] * 3)

    def sleep(seconds: float) -> None:
        prometheus.advance(seconds)
        lease = _lease_of(canary)
        assert lease is not None and lease["owner"] != "gone/1"
        expiries.append(lease["expires"])

    outcome = analysis.analyze(
        canary, ISVC, prometheus, registry, Settings(interval=60.0), report=lambda _: None,
        sleep=sleep,
    )  # fmt: skip
    assert outcome.result == "promoted"
    assert expiries == sorted(expiries) and len(set(expiries)) == 3  # renewed every interval
    assert _lease_of(canary) is None  # released at the end


def test_two_analyzers_racing_for_the_lease_one_wins(canary):
    first = analysis.Lease(canary, ISVC, ttl=600, owner="a")
    second = analysis.Lease(canary, ISVC, ttl=600, owner="b")
    first.acquire()
    with pytest.raises(ClusterError, match="being analyzed by a"):
        second.acquire()
    first.release()
    second.acquire()
    assert _lease_of(canary)["owner"] == "b"


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
