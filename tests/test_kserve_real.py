"""fineserve against a real Kubernetes API server with KServe's own controller and webhooks.

Real: kube-apiserver and etcd (Kubernetes 1.34), KServe v0.20.0's InferenceService controller
and admission webhooks (its defaulter, its validator, its pod mutator) with its CRDs and its
shipped `inferenceservice-config`, and kube-controller-manager's Deployment, ReplicaSet, HPA,
garbage-collector and namespace controllers: every object and status field read here was
written by the Kubernetes or KServe code that writes it on a cluster.
Emulated: the kubelet and the scheduler (controlplane/kubelet.go binds pods to one node and
reports container states; no container runs: pods are ready, never ready, or crash-looping as
the test says), the Gateway API implementation (controlplane/gateway.go accepts HTTPRoutes whose
Gateway and Services exist; no traffic flows), and Knative Serving, whose CRDs are installed but
whose controllers do not run (a Serverless-mode InferenceService gets a Knative Service that
nobody reconciles).
See docs/control-plane.md.
"""

from __future__ import annotations

import copy
import time

import pytest
from control_plane import BUILD_TIMEOUT_S, START_TIMEOUT_S, go_missing_reason

from fineserve.core.cluster import Cluster
from fineserve.core.errors import ClusterError
from fineserve.core.inference_service import (
    STANDARD,
    PredictorSettings,
    new_inference_service,
    standard_predictor_name,
)

pytestmark = [
    pytest.mark.skipif(go_missing_reason() is not None, reason=str(go_missing_reason())),
    # the first test may build the control plane (scripts/setup.sh builds it beforehand)
    pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S),
]

#: How long KServe and the controllers get to converge; seconds in practice.
CONVERGE_S = 90


def settings(version: str) -> PredictorSettings:
    """A predictor of ``version``, as the deploy step builds one."""
    return PredictorSettings(
        image="registry.example/fineserve-predictor:1",
        storage_uri=f"s3://models/fineserve/{version}",
        model_version=version,
    )


def wait_for(read, done, what: str, timeout: float = CONVERGE_S):
    """Poll ``read()`` until ``done(value)``; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s; last seen: {value}")
        time.sleep(0.5)


def deployment_of(isvc: str, version: str) -> str:
    """The Deployment (and Service, HPA) KServe names for a Standard-mode predictor.

    pkg/constants/constants.go, PredictorServiceName: `<isvc>-<predictor name>-predictor`.
    """
    return f"{isvc}-{standard_predictor_name(version)}-predictor"


def condition(obj: dict | None, kind: str) -> dict:
    for cond in (obj or {}).get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return {}


@pytest.fixture
def namespace(control_plane) -> str:
    return control_plane.namespace("isvc")


@pytest.fixture
def cluster(control_plane, namespace) -> Cluster:
    return Cluster(namespace=namespace, config_file=str(control_plane.kubeconfig))


def test_the_webhook_refuses_a_canary_that_autoscales(cluster, namespace):
    """KServe's validator refuses a Standard-mode canary with its own autoscaling.

    pkg/apis/serving/v1beta1/inference_service_validation.go, validateCanarySpecs: "canary uses
    fixed replicas". Nothing is created.
    """
    body = new_inference_service("refused", namespace, STANDARD, "sentiment", settings("1"))
    canary = new_inference_service("refused", namespace, STANDARD, "sentiment", settings("2"))
    canary_predictor = canary["spec"]["predictor"]
    assert canary_predictor["maxReplicas"] > 0
    body["spec"]["canary"] = [{"trafficPercent": 10, "predictor": canary_predictor}]

    with pytest.raises(ClusterError) as refused:
        cluster.create(body)

    message = str(refused.value)
    assert "denied the request" in message
    assert f"canary {canary_predictor['name']!r}".replace("'", '"') in message
    assert "must not set maxReplicas (canary uses fixed replicas)" in message
    assert cluster.get("refused") is None


def test_a_standard_inference_service_becomes_ready(control_plane, cluster, namespace):
    """KServe creates the Deployment, Service, HPA and HTTPRoute; the pods start; it is Ready."""
    from kubernetes import client

    cluster.create(
        new_inference_service("sentiment", namespace, STANDARD, "sentiment", settings("1"))
    )

    ready = wait_for(
        lambda: cluster.get("sentiment"),
        lambda isvc: condition(isvc, "Ready").get("status") == "True",
        "InferenceService Ready",
    )
    api = control_plane.api_client()
    deployment_name = deployment_of("sentiment", "1")
    deployment = client.AppsV1Api(api).read_namespaced_deployment(deployment_name, namespace)
    assert deployment.status.available_replicas == 1
    assert deployment.metadata.owner_references[0].name == "sentiment"
    client.CoreV1Api(api).read_namespaced_service(deployment_name, namespace)
    hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler(
        deployment_name, namespace
    )
    assert hpa.spec.max_replicas == settings("1").max_replicas
    route = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", namespace, "httproutes", deployment_name
    )
    backends = [ref["name"] for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backends == [deployment_name]
    assert condition(ready, "IngressReady").get("status") == "True"
    assert condition(ready, "PredictorReady").get("status") == "True"
    assert ready["status"]["modelStatus"]["transitionStatus"] == "UpToDate"


def test_a_crashing_predictor_is_reported_with_its_reason(control_plane, cluster, namespace):
    """A crash-looping kserve-container: KServe reports the model failed to load, and why."""
    deployment_name = deployment_of("crashing", "1")
    control_plane.set_pod_behaviour(namespace, deployment_name, "crash: no model at /mnt/models")

    cluster.create(
        new_inference_service("crashing", namespace, STANDARD, "sentiment", settings("1"))
    )

    failed = wait_for(
        lambda: cluster.get("crashing"),
        lambda isvc: (isvc or {}).get("status", {}).get("modelStatus", {}).get("lastFailureInfo"),
        "a model failure reported",
    )
    info = failed["status"]["modelStatus"]["lastFailureInfo"]
    assert info["reason"] == "ModelLoadFailed"
    assert info["message"] == "no model at /mnt/models"
    assert condition(failed, "Ready").get("status") != "True"


def test_the_cluster_client_reads_and_changes_inference_services(cluster, namespace):
    """The project's Cluster gets, creates, replaces and changes InferenceServices for real."""
    assert cluster.get("versions") is None
    created = cluster.create(
        new_inference_service("versions", namespace, STANDARD, "sentiment", settings("1"))
    )
    assert created["metadata"]["generation"] == 1

    def relabel(isvc: dict) -> dict:
        desired = copy.deepcopy(isvc)
        desired["metadata"]["labels"]["team"] = "ml"
        return desired

    def scale_up(isvc: dict) -> dict:
        desired = copy.deepcopy(isvc)
        desired["spec"]["predictor"]["minReplicas"] = 2
        return desired

    # KServe's controller writes the status meanwhile, so a plain read-then-replace may be
    # refused as stale (409): change() reads again and recomputes
    _, relabelled, written = cluster.change("versions", relabel)
    assert written and relabelled["metadata"]["labels"]["team"] == "ml"
    assert relabelled["metadata"]["generation"] == 1  # metadata only
    _, scaled, written = cluster.change("versions", scale_up)
    assert written and scaled["metadata"]["generation"] == 2
    assert cluster.change("versions", scale_up)[2] is False  # nothing left to change

    final = cluster.require("versions")
    assert final["metadata"]["labels"]["team"] == "ml"
    assert final["spec"]["predictor"]["minReplicas"] == 2
