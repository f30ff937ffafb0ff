"""`rollout analyze` on a real control plane: the analysis does not restart the model.

KServe copies the InferenceService's annotations into each predictor Deployment's pod template
and into the Knative revision template (pkg/controller/v1beta1/inferenceservice/components/
predictor.go, buildPredictorResources; reconcilers/knative/ksvc_reconciler.go), so anything the
analysis writes there, every interval, would roll the Deployments or make a revision. Here the
analysis runs as the pipeline's identity (manifests/base/pipeline-rbac.yaml, applied with
kubectl, RBAC enforced by the real API server) through several lease renewals and a promotion,
while the Deployments (Standard mode) or the Knative Service's revision template (Serverless
mode) that KServe's real controller writes are watched.

Real: kube-apiserver and etcd, kube-controller-manager (Deployments, ReplicaSets, the garbage
collector), KServe v0.20.0's controller and webhooks. Emulated: the kubelet; Prometheus is
scripted (tests/scripted_prometheus.py); Knative's controllers do not run here, so in
Serverless mode the Knative Service is checked, not its revisions (docs/control-plane.md).
"""

from __future__ import annotations

import copy
import time

import mlflow
import pytest
import yaml
from control_plane import BUILD_TIMEOUT_S, START_TIMEOUT_S, go_missing_reason
from manifests_helpers import MANIFESTS, apply, user_overlay
from scripted_prometheus import ScriptedPrometheus, sample

from fineserve.core import canary_analysis as analysis
from fineserve.core.artifacts import CHAMPION, TAG_STORAGE_URI
from fineserve.core.cluster import Cluster
from fineserve.core.inference_service import (
    SERVERLESS,
    STANDARD,
    PredictorSettings,
    new_inference_service,
    standard_predictor_name,
    start_canary,
)

pytestmark = [
    pytest.mark.skipif(go_missing_reason() is not None, reason=str(go_missing_reason())),
    pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S),
]

MODEL, ISVC, PIPELINE = "clf", "sentiment", "fineserve-pipeline"
#: Seconds for KServe and the controllers to converge.
CONVERGE_S = 90
#: Seconds each check watches for a change KServe would make after a write (it reacts in
#: well under one on this control plane).
WATCH_S = 2.0
#: Three inconclusive windows (three renewals at 10%), a pass, then the promotion.
WINDOWS = [{"2": sample(requests=3)}] * 3 + [{"2": sample()}]
SETTINGS = analysis.Settings(steps=(10, 100), interval=60.0)


def settings(version: str) -> PredictorSettings:
    return PredictorSettings(
        image="registry.example/fineserve:1",
        storage_uri=f"s3://models/{MODEL}/{version}",
        model_version=version,
    )


@pytest.fixture
def registry(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(MODEL)
    for version in ("1", "2"):
        uri = settings(version).storage_uri
        client.create_model_version(MODEL, uri, tags={TAG_STORAGE_URI: uri})
    return client


@pytest.fixture
def cluster(control_plane, tmp_path) -> Cluster:
    """A namespace with manifests/base's pipeline RBAC; a Cluster as `fineserve-pipeline`."""
    from kubernetes import client

    namespace = control_plane.namespace("analysis")
    objects = user_overlay(tmp_path / "overlay", namespace, MANIFESTS / "base")
    rbac = [o for o in objects if o["kind"] in ("Role", "RoleBinding")]
    apply(control_plane.kubeconfig, [o for o in objects if o["kind"] == "ServiceAccount"] + rbac)
    token = client.CoreV1Api(control_plane.api_client()).create_namespaced_service_account_token(
        PIPELINE,
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])),
    )
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token.status.token}
    kubeconfig = tmp_path / "pipeline-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    return Cluster(namespace=namespace, config_file=str(kubeconfig))


def wait_for(read, done, what: str, timeout: float = CONVERGE_S):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s; last seen: {value}")
        time.sleep(0.5)


def hold_still(read, expected, what: str, seconds: float = WATCH_S) -> None:
    """Fail as soon as ``read()`` differs from ``expected`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = read()
        assert now == expected, f"{what} changed: {_diff(expected, now)}"
        time.sleep(0.25)


def _diff(before, after) -> str:
    import difflib
    import json

    lines = [json.dumps(x, indent=1, sort_keys=True).splitlines() for x in (before, after)]
    return "\n".join(difflib.unified_diff(*lines, "before", "after", lineterm="", n=1))


def run_analysis(cluster: Cluster, registry, between_windows) -> analysis.Outcome:
    """The analysis over ``WINDOWS``; ``between_windows()`` runs while each one is held."""
    prometheus = ScriptedPrometheus(WINDOWS)

    def sleep(seconds: float) -> None:
        prometheus.advance(seconds)
        between_windows()

    return analysis.analyze(
        cluster, ISVC, prometheus, registry, SETTINGS, report=lambda _: None, sleep=sleep
    )


def lease_given_back_and_owned(cluster: Cluster) -> None:
    lease = analysis.analysis_lease(cluster, ISVC, ttl=1, holder="reader")
    assert lease.holder_now() is None
    from kubernetes import client

    stored = client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(
        lease.object_name, cluster.namespace
    )
    (owner,) = stored.metadata.owner_references
    assert (owner.kind, owner.uid) == ("InferenceService", cluster.require(ISVC)["metadata"]["uid"])


# ------------------------------------------------------------------------------ Standard mode


def canary_the_webhook_accepts(isvc: dict) -> dict:
    """A Standard-mode canary of v2 at 10% without autoscaling fields.

    KServe's validateCanarySpecs (pkg/apis/serving/v1beta1/inference_service_validation.go):
    "canary uses fixed replicas".
    """
    changed = start_canary(isvc, settings("2"), 10, "1")
    for field in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"):
        changed["spec"]["canary"][0]["predictor"].pop(field, None)
    return changed


def test_the_analysis_and_its_promotion_leave_the_predictor_deployments_alone(
    control_plane, cluster, registry
):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(control_plane.api_client())
    namespace = cluster.namespace
    stable, canary = (f"{ISVC}-{standard_predictor_name(v)}-predictor" for v in ("1", "2"))

    def deployments() -> dict:
        found = {}
        for name in (stable, canary):
            try:
                d = apps.read_namespaced_deployment(name, namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                continue
            template = client.ApiClient().sanitize_for_serialization(d.spec.template)
            found[name] = {"generation": d.metadata.generation, "template": template}
        return found

    cluster.create(new_inference_service(ISVC, namespace, STANDARD, MODEL, settings("1")))
    cluster.change(ISVC, canary_the_webhook_accepts)
    wait_for(
        lambda: cluster.require(ISVC).get("status", {}).get("canaryStatuses"),
        lambda statuses: bool(statuses) and statuses[0].get("ready") is True,
        "the canary Ready",
    )
    before = wait_for(deployments, lambda found: len(found) == 2, "both Deployments")
    annotations = cluster.require(ISVC)["metadata"].get("annotations")

    def nothing_rolls() -> None:
        hold_still(deployments, before, "a predictor Deployment during the analysis")
        assert cluster.require(ISVC)["metadata"].get("annotations") == annotations

    outcome = run_analysis(cluster, registry, nothing_rolls)

    assert outcome.result == "promoted", analysis.render(outcome)
    assert [i.percent for i in outcome.history] == [10, 10, 10, 10]
    # the promotion: the v1 Deployment goes; v2's, which now serves everything, stays as it was
    wait_for(deployments, lambda found: stable not in found, "the v1 Deployment deleted")
    hold_still(deployments, {canary: before[canary]}, "the promoted Deployment")
    lease_given_back_and_owned(cluster)
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 2


# ------------------------------------------------------------------------------ Serverless mode


def test_the_analysis_and_its_promotion_make_no_knative_revision(control_plane, cluster, registry):
    from kubernetes import client

    knative = client.CustomObjectsApi(control_plane.api_client())
    namespace = cluster.namespace

    def revision_template() -> dict | None:
        """The Knative Service's template: each change of it is a new revision."""
        from kubernetes.client.exceptions import ApiException

        try:
            ksvc = knative.get_namespaced_custom_object(
                "serving.knative.dev", "v1", namespace, "services", f"{ISVC}-predictor"
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return copy.deepcopy(ksvc["spec"]["template"])

    cluster.create(new_inference_service(ISVC, namespace, SERVERLESS, MODEL, settings("1")))
    wait_for(revision_template, lambda t: t is not None, "the Knative Service")
    cluster.change(ISVC, lambda isvc: start_canary(isvc, settings("2"), 10, "1"))
    before = wait_for(
        revision_template,
        lambda t: t["metadata"]["labels"].get("fineserve.io/model-version") == "2",
        "the canary's revision template",
    )

    def no_new_revision() -> None:
        hold_still(revision_template, before, "the Knative revision template")

    outcome = run_analysis(cluster, registry, no_new_revision)

    assert outcome.result == "promoted", analysis.render(outcome)
    predictor = cluster.require(ISVC)["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor  # all traffic to the latest revision
    hold_still(revision_template, before, "the Knative revision template after the promotion")
    lease_given_back_and_owned(cluster)
    assert registry.get_model_version_by_alias(MODEL, CHAMPION).version == 2
