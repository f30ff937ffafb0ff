"""The fake API server keeps the contract the rollout tests rely on (with the real clients)."""

from __future__ import annotations

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

ARGS = ("serving.kserve.io", "v1beta1", "fineserve", "inferenceservices")


def body(name="m", uri="s3://b/m") -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {
            "predictor": {
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "i",
                        "env": [{"name": "STORAGE_URI", "value": uri}],
                    }
                ]
            }
        },
    }


@pytest.fixture
def api(fake_kube, tmp_path):
    path = fake_kube.kubeconfig(tmp_path / "kubeconfig")
    return client.CustomObjectsApi(config.new_client_from_config(str(path)))


def status_of(call) -> tuple[int, str]:
    with pytest.raises(ApiException) as raised:
        call()
    import json

    return raised.value.status, json.loads(raised.value.body)["message"]


def test_create_get_list_and_409_on_a_taken_name(api):
    created = api.create_namespaced_custom_object(*ARGS, body())
    assert created["metadata"]["generation"] == 1 and created["metadata"]["resourceVersion"]
    assert (
        api.get_namespaced_custom_object(*ARGS, "m")["metadata"]["uid"]
        == created["metadata"]["uid"]
    )
    api.create_namespaced_custom_object(*ARGS, {**body("n"), "metadata": {"name": "n"}})
    listed = api.list_namespaced_custom_object(*ARGS, label_selector="team=a")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["m"]
    assert status_of(lambda: api.create_namespaced_custom_object(*ARGS, body())) == (
        409,
        'inferenceservices.serving.kserve.io "m" already exists',
    )
    code, message = status_of(lambda: api.get_namespaced_custom_object(*ARGS, "zz"))
    assert (code, message) == (404, 'inferenceservices.serving.kserve.io "zz" not found')


def test_put_needs_the_current_resource_version(api):
    created = api.create_namespaced_custom_object(*ARGS, body())
    stale = dict(created)
    newer = api.replace_namespaced_custom_object(
        *ARGS, "m", {**created, "spec": body(uri="s3://b/2")["spec"]}
    )
    assert newer["metadata"]["generation"] == 2
    code, message = status_of(lambda: api.replace_namespaced_custom_object(*ARGS, "m", stale))
    assert code == 409 and "the object has been modified" in message
    missing = {
        **newer,
        "metadata": {k: v for k, v in newer["metadata"].items() if k != "resourceVersion"},
    }
    code, message = status_of(lambda: api.replace_namespaced_custom_object(*ARGS, "m", missing))
    assert code == 422 and "must be specified for an update" in message


def test_merge_and_json_patch_and_refused_patch_types(api, fake_kube):
    api.create_namespaced_custom_object(*ARGS, body())
    api.api_client.set_default_header("Content-Type", "application/merge-patch+json")
    patched = api.patch_namespaced_custom_object(
        *ARGS, "m", {"spec": {"predictor": {"canaryTrafficPercent": 30}}}
    )
    assert patched["spec"]["predictor"]["canaryTrafficPercent"] == 30
    api.api_client.set_default_header("Content-Type", "application/json-patch+json")
    patched = api.patch_namespaced_custom_object(
        *ARGS, "m", [{"op": "replace", "path": "/spec/predictor/canaryTrafficPercent", "value": 40}]
    )
    assert patched["spec"]["predictor"]["canaryTrafficPercent"] == 40
    failing = [{"op": "test", "path": "/spec/predictor/canaryTrafficPercent", "value": 1}]
    assert status_of(lambda: api.patch_namespaced_custom_object(*ARGS, "m", failing))[0] == 422
    api.api_client.set_default_header("Content-Type", "application/strategic-merge-patch+json")
    assert status_of(lambda: api.patch_namespaced_custom_object(*ARGS, "m", {"spec": {}}))[0] == 415
    unknown = {"spec": {"predictor": {"canaryTrafficPercnt": 5}}}
    api.api_client.set_default_header("Content-Type", "application/merge-patch+json")
    code, message = status_of(lambda: api.patch_namespaced_custom_object(*ARGS, "m", unknown))
    assert code == 422 and "canaryTrafficPercnt" in message


def test_watch_streams_changes(api, fake_kube):
    created = api.create_namespaced_custom_object(*ARGS, body())
    obj = fake_kube.get(*ARGS[:2], "inferenceservices", "fineserve", "m")
    obj["metadata"]["labels"]["team"] = "b"
    fake_kube.put(obj)
    events = [
        (e["type"], e["object"]["metadata"]["labels"]["team"])
        for e in watch.Watch().stream(
            api.list_namespaced_custom_object,
            *ARGS,
            resource_version=created["metadata"]["resourceVersion"],
            timeout_seconds=1,
        )
    ]
    assert events == [("MODIFIED", "b")]


def test_rbac_401_and_403(fake_kube, tmp_path):
    path = fake_kube.kubeconfig(tmp_path / "k", user="system:serviceaccount:fineserve:nobody")
    api = client.CustomObjectsApi(config.new_client_from_config(str(path)))
    code, message = status_of(lambda: api.get_namespaced_custom_object(*ARGS, "m"))
    assert code == 403 and 'User "system:serviceaccount:fineserve:nobody" cannot get' in message
    fake_kube.put(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "r", "namespace": "fineserve"},
            "rules": [
                {
                    "apiGroups": ["serving.kserve.io"],
                    "resources": ["inferenceservices"],
                    "verbs": ["get"],
                }
            ],
        }
    )
    fake_kube.put(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "b", "namespace": "fineserve"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": "fineserve"}],
        }
    )
    assert status_of(lambda: api.get_namespaced_custom_object(*ARGS, "m"))[0] == 404
    assert status_of(lambda: api.create_namespaced_custom_object(*ARGS, body()))[0] == 403
    api.api_client.configuration.api_key = {}
    api.api_client.default_headers.pop("authorization", None)
    anonymous = client.CustomObjectsApi(client.ApiClient(api.api_client.configuration))
    anonymous.api_client.configuration.api_key = {}
    assert status_of(lambda: anonymous.get_namespaced_custom_object(*ARGS, "m"))[0] == 401
