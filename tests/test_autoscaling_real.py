"""Serverless autoscaling on cpu or memory, against KServe's real admission webhook.

Real: kube-apiserver and KServe v0.20.0's InferenceService validator and defaulter, and its
controller, which writes the Knative Service whose revision template Knative's autoscaler
reads. Requests are dry runs where only the webhook's answer matters (KServe's webhooks declare
no side effects, so the API server calls them for dry runs too). See docs/control-plane.md.
"""

from __future__ import annotations

import copy
import time

import pytest
from control_plane import BUILD_TIMEOUT_S, START_TIMEOUT_S, go_missing_reason

from fineserve.core.cluster import Cluster
from fineserve.core.errors import ParameterError
from fineserve.core.inference_service import (
    API_VERSION,
    AUTOSCALER_CLASS_ANNOTATION,
    GROUP,
    HPA_CLASS,
    PLURAL,
    SERVERLESS,
    PredictorSettings,
    check_settings,
    new_inference_service,
    start_canary,
)

pytestmark = [
    pytest.mark.skipif(go_missing_reason() is not None, reason=str(go_missing_reason())),
    pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S),
]

CONVERGE_S = 90


def settings(version: str, metric: str = "", target: int = 0) -> PredictorSettings:
    return PredictorSettings(
        image="registry.example/fineserve:1",
        storage_uri=f"s3://models/clf/{version}",
        model_version=version,
        scale_metric=metric,
        scale_target=target,
    )


@pytest.fixture
def webhook(control_plane):
    """``send(body)``: the API server's answer to creating it, as a dry run (status, body)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(control_plane.api_client())
    namespace = control_plane.namespace("autoscaling")

    def send(body: dict, *, dry_run: bool = True, update: bool = False) -> tuple[int, str]:
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        args = (GROUP, API_VERSION, namespace, PLURAL)
        extra = {"dry_run": "All"} if dry_run else {}
        try:
            if update:
                api.replace_namespaced_custom_object(*args, body["metadata"]["name"], body, **extra)
            else:
                api.create_namespaced_custom_object(*args, body, **extra)
        except ApiException as err:
            return err.status, err.body
        return 200, ""

    send.api, send.namespace = api, namespace
    return send


@pytest.mark.parametrize(("metric", "target"), [("cpu", 0), ("memory", 100)])
def test_kserve_refuses_cpu_or_memory_without_the_hpa_class_and_takes_what_deploy_sends(
    webhook, metric, target
):
    body = new_inference_service("scaled", "", SERVERLESS, "clf", settings("1", metric, target))
    status, message = webhook(body)
    assert (status, message) == (200, ""), f"KServe refuses what deploy sends: {message}"

    assert body["metadata"]["annotations"][AUTOSCALER_CLASS_ANNOTATION] == HPA_CLASS
    without = copy.deepcopy(body)
    del without["metadata"]["annotations"][AUTOSCALER_CLASS_ANNOTATION]
    status, message = webhook(without)
    assert status == 403 and f"[{metric}] is not a supported metric" in message, message


def test_a_canary_that_changes_the_metric_changes_the_class_with_it(control_plane, webhook):
    """Concurrency (KPA), then cpu (HPA), then concurrency: each write accepted, the class too."""
    from kubernetes.client.exceptions import ApiException

    cluster = Cluster(namespace=webhook.namespace, config_file=str(control_plane.kubeconfig))
    cluster.create(
        new_inference_service("switch", webhook.namespace, SERVERLESS, "clf", settings("1"))
    )
    assert AUTOSCALER_CLASS_ANNOTATION not in cluster.require("switch")["metadata"]["annotations"]

    _, on_cpu, _ = cluster.change(
        "switch", lambda i: start_canary(i, settings("2", "cpu"), 10, "1")
    )
    assert on_cpu["metadata"]["annotations"][AUTOSCALER_CLASS_ANNOTATION] == HPA_CLASS

    # what Knative's autoscaler reads: KServe copies the class into the revision template
    deadline = time.monotonic() + CONVERGE_S
    while True:
        try:
            ksvc = webhook.api.get_namespaced_custom_object(
                "serving.knative.dev", "v1", webhook.namespace, "services", "switch-predictor"
            )
            annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
            if annotations.get("autoscaling.knative.dev/metric") == "cpu":
                break
        except ApiException as err:
            if err.status != 404:
                raise
            annotations = {}
        assert time.monotonic() < deadline, f"no cpu revision template: {annotations}"
        time.sleep(0.5)
    assert annotations[AUTOSCALER_CLASS_ANNOTATION] == HPA_CLASS

    _, back, _ = cluster.change("switch", lambda isvc: start_canary(isvc, settings("3"), 10, "2"))
    assert AUTOSCALER_CLASS_ANNOTATION not in back["metadata"]["annotations"]


@pytest.mark.parametrize("metric", ["cpu", "memory"])
@pytest.mark.parametrize("target", [1, 100, 101, 2048])
def test_fineserve_refuses_the_targets_kserve_refuses(webhook, metric, target):
    """Targets on Knative's HPA: fineserve's check agrees with KServe's webhook."""
    allowed = new_inference_service("target", "", SERVERLESS, "clf", settings("1", metric, 50))
    allowed["spec"]["predictor"]["scaleTarget"] = target
    status, message = webhook(allowed)
    try:
        check_settings(SERVERLESS, settings("1", metric, target))
    except ParameterError as refused:
        assert status == 403 and "should be a [1-100] integer" in message, message
        assert "KServe allows 1-100" in str(refused)
    else:
        assert (status, message) == (200, "")
