"""`fineserve rollout analyze` end to end, on real parts.

A real Prometheus (started here on 127.0.0.1, scraping every second) scrapes five real predictor
processes: the stable version, a good canary, a canary that fails or stalls on part of its
requests, one that answers 200 quickly but predicts one class for everything, and one that
refuses every request stable answers (400: it takes fewer texts per request). A weighted
router follows the traffic split in the emulated InferenceService's status while a bounded
load generator sends real tweets; the analysis reads Prometheus' HTTP API and moves the traffic
through the fake API server, as on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from serving_helpers import (
    REPO,
    BackgroundServer,
    ServerProcess,
    free_port,
    serve_module_argv,
    v2_body,
)

from fineserve.components.canary_analysis import analyze_canary
from fineserve.components.decorator import call_component
from fineserve.components.deploy import rollout_version
from fineserve.core import canary_analysis as analysis
from fineserve.core.artifacts import CHAMPION, PREVIOUS, TAG_STORAGE_URI
from fineserve.core.cluster import Cluster
from fineserve.core.inference_service import PredictorSettings, read_rollout

pytestmark = pytest.mark.slow

MODEL = "clf"
ISVC = "fineserve"
SERVED_NAME = "fineserve"  # the predictors' --model_name, as the InferenceService runs them
STABLE, GOOD, FAULTY, ONE_CLASS, REFUSING = "1", "2", "3", "4", "5"
INTERVAL = 3.0  # seconds per check; Prometheus scrapes every second
RATE = 70  # requests per second from the load generator, in all


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus is not installed: scripts/setup.sh installs the Debian package")
    return found


def _spread_head(source: Path, texts: list[str], out: Path, version: str, bias0: float = 0.0):
    """A copy of ``source`` whose head separates real texts (a random tiny BERT's does not).

    The head reads the pooled output standardised over ``texts``, so the three labels each
    get a share of real tweets; ``bias0`` pushes every text towards label 0.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.no_grad():
        encoded = tokenizer(
            texts, truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        pooled = model.bert(**encoded)[1]
        weight = (
            3 * torch.randn_like(model.classifier.weight) / (pooled.std(0) * pooled.shape[1] ** 0.5)
        )
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-(weight @ pooled.mean(0)))
        model.classifier.bias[0] += bias0
    shutil.copytree(source, out)
    model.save_pretrained(out)
    (out / "fineserve.json").write_text(json.dumps({"model_version": version}))
    return out


@pytest.fixture(scope="module")
def texts(corpus_frame) -> list[str]:
    return corpus_frame["text"].sample(400, random_state=0).tolist()


@pytest.fixture(scope="module")
def predictors(tiny_classifier, texts, tmp_path_factory):
    """Version → URL of the five running predictors."""
    root = tmp_path_factory.mktemp("canary-predictors")
    stable = _spread_head(tiny_classifier, texts[:200], root / "v1", STABLE)
    dirs = {
        STABLE: stable,
        GOOD: _spread_head(tiny_classifier, texts[:200], root / "v2", GOOD),
        FAULTY: _spread_head(tiny_classifier, texts[:200], root / "v3", FAULTY),
        ONE_CLASS: _spread_head(tiny_classifier, texts[:200], root / "v4", ONE_CLASS, 50.0),
        REFUSING: _spread_head(tiny_classifier, texts[:200], root / "v5", REFUSING),
    }
    # passes in threads: five servers with two forward processes each would crowd 2 cores
    options = ("--device", "cpu", "--forward_in", "threads")
    argv = {v: serve_module_argv(d, SERVED_NAME, *options) for v, d in dirs.items()}
    # deployed with a lower limit than its clients' requests: every one of them is a 400
    argv[REFUSING] += ["--max_texts_per_request", "1"]
    # 30% of its requests fail inside the model (500), 20% take half a second longer
    argv[FAULTY] = [
        sys.executable, str(REPO / "tests" / "faulty_predictor.py"), "0.3", "0.2", "0.5",
        *argv[FAULTY][3:],
    ]  # fmt: skip
    # five start at once on two busy cores: a generous start-up limit
    servers = {
        v: ServerProcess(a, log_path=root / f"v{v}.log", startup_timeout=240)
        for v, a in argv.items()
    }
    with ThreadPoolExecutor(len(servers)) as pool:
        started = list(pool.map(lambda s: s.__enter__(), servers.values()))
    try:
        yield {version: server.url for version, server in zip(servers, started, strict=True)}
    finally:
        for server in started:
            server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def prometheus(predictors, tmp_path_factory):
    """A real Prometheus scraping the predictors every second: its URL."""
    binary = _prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    targets = [url.removeprefix("http://") for url in predictors.values()]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "predictors", "static_configs": [{"targets": targets}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with BackgroundServer(
        argv, f"{url}/-/ready", log_path=root / "prometheus.log", what="prometheus", timeout=60
    ):
        yield url


class Router:
    """Sends each request to the stable or the canary predictor by the split in the status."""

    def __init__(self, fake, predictors: dict[str, str]) -> None:
        self.fake, self.predictors = fake, predictors
        self.stable, self.canary, self.percent = STABLE, None, 0
        self.lock = threading.Lock()

    def follow(self) -> None:
        isvc = self.fake.get("serving.kserve.io", "v1beta1", "inferenceservices", "fineserve", ISVC)
        state = read_rollout(isvc)
        with self.lock:
            self.stable = state.stable.version
            canary = state.canary
            self.canary, self.percent = (canary.version, canary.percent) if canary else (None, 0)

    def pick(self) -> str:
        with self.lock:
            use_canary = self.canary is not None and random.random() * 100 < self.percent
            return self.predictors[self.canary if use_canary else self.stable]


class Load:
    """A bounded load generator: ``RATE`` requests a second over a few workers, until stopped."""

    def __init__(
        self, router: Router, texts: list[str], workers: int = 4, texts_per_request: int = 1
    ) -> None:
        self.router, self.texts, self.workers = router, texts, workers
        self.texts_per_request = texts_per_request
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        self.follower = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Load:
        self.router.follow()
        for thread in (*self.threads, self.follower):
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in (*self.threads, self.follower):
            thread.join(timeout=10)

    def _follow(self) -> None:
        while not self.stop.wait(0.2):
            self.router.follow()

    def _work(self) -> None:
        period = self.workers / RATE
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                url = self.router.pick()
                body = v2_body(random.sample(self.texts, self.texts_per_request))
                with contextlib.suppress(httpx.HTTPError):
                    http.post(f"{url}/v2/models/{SERVED_NAME}/infer", json=body)
                self.stop.wait(max(0.0, period - (time.monotonic() - started)))


@pytest.fixture
def registry(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(MODEL)
    for version in (STABLE, GOOD, FAULTY, ONE_CLASS, REFUSING):
        client.create_model_version(
            MODEL, f"s3://models/v{version}", tags={TAG_STORAGE_URI: f"s3://models/v{version}"}
        )
    return client


def _deploy(cluster: Cluster, client, mode: str, version: str) -> None:
    settings = PredictorSettings(
        image="registry.example/fineserve:test",
        storage_uri=f"s3://models/v{version}",
        model_version=version,
        served_model_name=SERVED_NAME,
        scale_metric="cpu" if mode == "Standard" else "",
    )
    rollout_version(
        cluster, client, name=ISVC, model_name=MODEL, mode=mode, settings=settings,
        canary_percent=10, timeout=10, interval=0.05,
    )  # fmt: skip


@pytest.fixture
def canary(fake_kube, kserve_controller, registry, predictors, tmp_path, monkeypatch):
    """Deploy v1, then ``version`` as a 10% canary, in ``mode``: the cluster handle."""
    monkeypatch.setenv("KUBECONFIG", str(fake_kube.kubeconfig(tmp_path / "kubeconfig")))

    def start(mode: str, version: str) -> Cluster:
        cluster = Cluster(context="fake", namespace="fineserve")
        _deploy(cluster, registry, mode, STABLE)
        _deploy(cluster, registry, mode, version)
        return cluster

    return start


SETTINGS = analysis.Settings(
    interval=INTERVAL,
    threshold=2,
    max_inconclusive=4,
    # tiny windows of a tiny model on two busy cores: a looser latency margin than a cluster's
    thresholds=analysis.Thresholds(min_requests=8, p99_margin_seconds=0.1),
)


def _assert_promoted(cluster, registry) -> None:
    state = read_rollout(cluster.require(ISVC))
    assert state.served_version == GOOD and state.canary is None
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == int(GOOD)
    assert registry.get_model_version_by_alias(MODEL, PREVIOUS).version == int(STABLE)
    lease = analysis.analysis_lease(cluster, ISVC, ttl=1, holder="reader")
    assert lease.holder_now() is None  # the lease was given back


def test_a_good_canary_is_stepped_up_and_promoted(
    canary, fake_kube, registry, predictors, prometheus, texts
):
    cluster = canary("Serverless", GOOD)
    seen: list[str] = []
    with Load(Router(fake_kube, predictors), texts):
        outcome = analysis.analyze(
            cluster, ISVC, analysis.Prometheus(prometheus), registry, SETTINGS, report=seen.append
        )
    assert outcome.result == "promoted", "\n".join(seen)
    assert [i.percent for i in outcome.history if i.verdict is analysis.PASS] == [10, 25, 50]
    _assert_promoted(cluster, registry)


def test_the_pipeline_step_promotes_a_good_standard_mode_canary_and_reports_it(
    canary, fake_kube, registry, predictors, prometheus, texts, tmp_path
):
    cluster = canary("Standard", GOOD)
    report = tmp_path / "report.md"
    t = SETTINGS.thresholds
    with Load(Router(fake_kube, predictors), texts):
        result = call_component(
            analyze_canary, report=str(report), prometheus_url=prometheus,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", inference_service=ISVC,
            namespace="fineserve", kube_context="fake", analysis_interval=INTERVAL,
            analysis_max_inconclusive=SETTINGS.max_inconclusive,
            min_requests=t.min_requests, p99_margin_seconds=t.p99_margin_seconds,
        )  # fmt: skip
    assert result.outputs.result == "promoted", report.read_text()
    _assert_promoted(cluster, registry)
    markdown = report.read_text()
    assert "InferenceService `fineserve`: **promoted**" in markdown
    assert re.search(r"^\| \d+\. label divergence \| 10% \| pass \| 0\.\d+ \|", markdown, re.M)


def test_a_canary_failing_part_of_its_requests_is_rolled_back(
    canary, fake_kube, registry, predictors, prometheus, texts
):
    cluster = canary("Serverless", FAULTY)
    seen: list[str] = []
    with Load(Router(fake_kube, predictors), texts):
        outcome = analysis.analyze(
            cluster, ISVC, analysis.Prometheus(prometheus), registry, SETTINGS, report=seen.append
        )
    assert outcome.result == "rolled-back", "\n".join(seen)
    failed = {c.name for i in outcome.history for c in i.checks if c.verdict is analysis.FAIL}
    assert {"success rate", "p99 latency"} <= failed, "\n".join(seen)
    state = read_rollout(cluster.require(ISVC))
    assert state.served_version == STABLE and state.canary.percent == 0
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == int(STABLE)
    report = analysis.render(outcome)
    assert "success rate" in report and "FAIL" in report and ">= 0.99" in report


def test_a_fast_error_free_canary_predicting_one_class_is_rolled_back_by_the_cli(
    canary, fake_kube, registry, predictors, prometheus, texts, tmp_path
):
    canary("Standard", ONE_CLASS)
    env = {**os.environ, "PROMETHEUS_URL": prometheus}
    env.pop("MLFLOW_TRACKING_URI", None)
    with Load(Router(fake_kube, predictors), texts):
        run = subprocess.run(
            [
                sys.executable, "-m", "fineserve", "rollout", "analyze", ISVC, "-n", "fineserve",
                "--context", "fake", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                "--interval", str(INTERVAL), "--min-requests", "8", "--p99-margin-seconds", "0.1",
                "--max-inconclusive", "4",
            ],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    assert "analysis rolled-back" in out and "label divergence" in out, out
    failed_lines = [line for line in out.splitlines() if " FAIL " in line]
    assert failed_lines and all("label divergence" in line for line in failed_lines), out
    assert "neutral 0%" not in out and "{negative 100%}" in out, out  # the distribution shown
    state = read_rollout(Cluster(context="fake", namespace="fineserve").require(ISVC))
    assert state.served_version == STABLE and state.canary is None
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == int(STABLE)


def test_a_canary_refusing_every_request_stable_answers_is_rolled_back(
    canary, fake_kube, registry, predictors, prometheus, texts
):
    cluster = canary("Serverless", REFUSING)
    seen: list[str] = []
    with Load(Router(fake_kube, predictors), texts, texts_per_request=2):
        outcome = analysis.analyze(
            cluster, ISVC, analysis.Prometheus(prometheus), registry, SETTINGS, report=seen.append
        )
    assert outcome.result == "rolled-back", "\n".join(seen)
    failed = [c for i in outcome.history for c in i.checks if c.verdict is analysis.FAIL]
    assert {c.name for c in failed} == {"client errors", "predictions"}, "\n".join(seen)
    assert all(c.value == 1.0 for c in failed if c.name == "client errors"), "\n".join(seen)
    # fast and without a server error, yet no step passed on those checks alone
    assert all(i.verdict is not analysis.PASS for i in outcome.history), "\n".join(seen)
    state = read_rollout(cluster.require(ISVC))
    assert state.served_version == STABLE and state.canary.percent == 0
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == int(STABLE)
