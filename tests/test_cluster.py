"""The real rollout flow on a real cluster: opt in with `pytest -m cluster` (docs/cluster-ci.md).

Needs KServe on the cluster in KUBECONFIG, and:

| variable | what | default |
|---|---|---|
| FINESERVE_CLUSTER_NAMESPACE | namespace with manifests/ applied | fineserve |
| FINESERVE_CLUSTER_MODE | KServe mode the cluster runs | Standard |
| FINESERVE_CLUSTER_IMAGE | the predictor image, pullable by the cluster | (required) |
| FINESERVE_CLUSTER_STORAGE_URI | an s3:// HF model directory KServe can read | (required) |
| MLFLOW_TRACKING_URI | registry the versions go to (a local SQLite store is fine) | ./mlflow.db |

The InferenceService `fineserve-cluster-test` is deleted at the end.
"""

from __future__ import annotations

import os
import uuid

import pytest

pytestmark = pytest.mark.cluster

NAME = "fineserve-cluster-test"


@pytest.fixture(scope="module")
def setting():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG is not set")
    missing = [
        v
        for v in ("FINESERVE_CLUSTER_IMAGE", "FINESERVE_CLUSTER_STORAGE_URI")
        if v not in os.environ
    ]
    if missing:
        pytest.fail(f"set {', '.join(missing)} (see docs/cluster-ci.md)")
    return {
        "namespace": os.environ.get("FINESERVE_CLUSTER_NAMESPACE", "fineserve"),
        "mode": os.environ.get("FINESERVE_CLUSTER_MODE", "Standard"),
        "image": os.environ["FINESERVE_CLUSTER_IMAGE"],
        "storage_uri": os.environ["FINESERVE_CLUSTER_STORAGE_URI"],
    }


@pytest.fixture(scope="module")
def versions(setting):
    from fineserve.core import registry
    from fineserve.core.artifacts import TAG_STORAGE_URI

    client = registry.mlflow_client()
    name = f"fineserve-cluster-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(
            name, setting["storage_uri"], tags={TAG_STORAGE_URI: setting["storage_uri"]}
        )
    return client, name


@pytest.fixture(scope="module")
def cluster(setting):
    from fineserve.core.cluster import Cluster

    cluster = Cluster(namespace=setting["namespace"])
    yield cluster
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.api.delete_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", setting["namespace"], "inferenceservices", NAME
        )
    except ApiException as err:
        if err.status != 404:
            raise


def deploy(setting, versions, version: int):
    from fineserve.components.decorator import call_component
    from fineserve.components.deploy import deploy

    client, name = versions
    context = _current_context()
    result = call_component(
        deploy,
        report=os.devnull,
        model_name=name,
        model_version=str(version),
        tracking_uri=client.tracking_uri,
        inference_service=NAME,
        namespace=setting["namespace"],
        kube_context=context,
        deployment_mode=setting["mode"],
        image=setting["image"],
        predictor_cpu="100m",
        predictor_memory="512Mi",
        predictor_memory_limit="2Gi",
        ready_timeout=600,
    )
    return result.outputs


def _current_context() -> str:
    from kubernetes import config

    _, active = config.list_kube_config_contexts(config_file=os.environ["KUBECONFIG"])
    return active["name"]


def test_first_deploy_canary_promote_rollback_on_a_real_cluster(setting, versions, cluster):
    from fineserve.core import rollout
    from fineserve.core.artifacts import CHAMPION, PREVIOUS

    client, name = versions
    assert deploy(setting, versions, 1)[0] == "created"
    assert rollout.aliases_of(client, name)[CHAMPION] == "1"

    assert deploy(setting, versions, 2)[0] == "canary"
    status = rollout.status(cluster, NAME, client)
    assert status.rollout.canary.version == "2" and status.rollout.canary.ready
    assert deploy(setting, versions, 2)[0] == "unchanged"

    rollout.promote(cluster, NAME, client)
    done, obj, why = cluster.wait(
        NAME, lambda o: (rollout.read_rollout(o).ready, "not Ready"), timeout=600
    )
    assert done, why
    assert rollout.read_rollout(obj).served_version == "2"
    aliases = rollout.aliases_of(client, name)
    assert (aliases[CHAMPION], aliases[PREVIOUS]) == ("2", "1")

    assert deploy(setting, versions, 3)[0] == "canary"
    rollout.rollback(cluster, NAME)
    assert rollout.read_rollout(cluster.require(NAME)).served_version == "2"
    assert rollout.aliases_of(client, name)[CHAMPION] == "2"
