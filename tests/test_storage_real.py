"""The model download on a real control plane: what KServe's pod mutator gives the initializer.

Real: kube-apiserver, kube-controller-manager (the Deployment and ReplicaSet controllers create
the predictor's pod) and KServe v0.20.0's controller and pod mutator, which injects the
storage-initializer init container with the S3 settings it finds for the pod's ServiceAccount
(pkg/webhook/admission/pod/storage_initializer_injector.go, pkg/credentials). The objects are
manifests/ as `kubectl kustomize` builds them, applied with `kubectl`; the credentials Secret is
created the way README.md says. Then KServe's storage-initializer code (the `kserve-storage`
package, run as its `initializer-entrypoint` runs it) downloads the model with exactly the
environment and arguments of that init container, from an S3 API (moto) on 127.0.0.1.
Emulated: the kubelet (no container runs; see docs/control-plane.md).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from control_plane import BUILD_TIMEOUT_S, START_TIMEOUT_S, go_missing_reason
from manifests_helpers import MANIFESTS, apply, kubectl, one, user_overlay

from fineserve.core.cluster import Cluster
from fineserve.core.inference_service import (
    STANDARD,
    PredictorSettings,
    new_inference_service,
)

pytestmark = [
    pytest.mark.skipif(go_missing_reason() is not None, reason=str(go_missing_reason())),
    pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S),
]

OVERLAY = MANIFESTS / "overlays" / "standard"
SECRET, ACCOUNT = "fineserve-s3", "fineserve-storage"
ENDPOINT = "serving.kserve.io/s3-endpoint"
#: What a predictor downloads with: the ServiceAccount and the Secret it lists.
_STORAGE = {("ServiceAccount", ACCOUNT), ("Secret", SECRET)}
#: Seconds for the controllers to create the predictor's pod.
CONVERGE_S = 90


def overlay(folder: Path, namespace: str, secret_annotations: dict | None = None) -> list[dict]:
    """The Standard overlay in a user's overlay: its namespace, maybe its own object store.

    ``secret_annotations`` patch the storage Secret, as manifests/README.md tells a user with
    another object store to do.
    """
    patches = []
    if secret_annotations:
        patch = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "annotations": secret_annotations},
        }
        patches.append(
            {"target": {"kind": "Secret", "name": SECRET}, "patch": yaml.safe_dump(patch)}
        )
    return user_overlay(folder, namespace, OVERLAY, patches)


def install_storage(kubeconfig: Path, namespace: str, objects: list[dict]) -> dict:
    """README.md's order: the credentials Secret first, then the manifests' objects applied.

    Returns the Secret as the cluster then holds it.
    """
    kubectl(
        kubeconfig, "-n", namespace, "create", "secret", "generic", SECRET,
        "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing",
    )  # fmt: skip
    one(objects, "ServiceAccount", ACCOUNT)
    apply(kubeconfig, [o for o in objects if (o["kind"], o["metadata"]["name"]) in _STORAGE])
    return yaml.safe_load(kubectl(kubeconfig, "-n", namespace, "get", "secret", SECRET, "-oyaml"))


def storage_initializer(control_plane, namespace: str, isvc: str) -> dict:
    """The storage-initializer init container of the first pod of ``isvc``'s predictor."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    deadline = time.monotonic() + CONVERGE_S
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"serving.kserve.io/inferenceservice={isvc}"
        ).items
        for pod in pods:
            for container in pod.spec.init_containers or []:
                if container.name == "storage-initializer":
                    return client.ApiClient().sanitize_for_serialization(container)
        time.sleep(0.5)
    pytest.fail(f"no pod of {isvc} with a storage-initializer within {CONVERGE_S} s")


def plain_env(container: dict, secret: dict) -> dict[str, str]:
    """The container's environment as its process sees it (secretKeyRefs read from ``secret``)."""
    env = {}
    for var in container.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"], f"{var['name']} from {ref}"
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            env[var["name"]] = var.get("value", "")
    return env


def expected_s3_env(annotations: dict) -> dict[str, str]:
    """The environment KServe makes of the Secret's annotations.

    pkg/credentials/s3/utils.go, BuildS3EnvVars and getEndpointConfiguration: an endpoint
    without a scheme is https unless s3-usehttps is "0".
    """
    endpoint = annotations[ENDPOINT]
    https = annotations.get("serving.kserve.io/s3-usehttps", "1")
    return {
        "S3_ENDPOINT": endpoint,
        "AWS_ENDPOINT_URL": f"{'http' if https == '0' else 'https'}://{endpoint}",
        "S3_USE_HTTPS": https,
        "S3_VERIFY_SSL": annotations["serving.kserve.io/s3-verifyssl"],
        "AWS_DEFAULT_REGION": annotations["serving.kserve.io/s3-region"],
    }


def test_kserve_gives_the_download_the_object_store_and_credentials_of_the_manifests(
    control_plane, tmp_path
):
    """The overlay as shipped: KServe points the storage initializer at MLflow's MinIO."""
    namespace = control_plane.namespace("storage")
    objects = overlay(tmp_path / "overlay", namespace)
    secret = install_storage(control_plane.kubeconfig, namespace, objects)
    # applying the manifests kept the keys the Secret was created with
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # KServe's settings as the manifests give them (wherever they put them)
    manifest_annotations = {
        key: value
        for obj in objects
        if (obj["kind"], obj["metadata"]["name"]) in _STORAGE
        for key, value in (obj["metadata"].get("annotations") or {}).items()
        if key.startswith("serving.kserve.io/s3-")
    }
    # the manifests' own InferenceService (it downloads with fineserve-storage)
    apply(control_plane.kubeconfig, [one(objects, "InferenceService")])

    container = storage_initializer(control_plane, namespace, "fineserve")
    env = {v["name"]: v for v in container.get("env") or []}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env.get(key, {}).get("valueFrom") == {
            "secretKeyRef": {"name": SECRET, "key": key}
        }, f"the storage initializer does not get {key} from the Secret {SECRET}: {env}"
    got = {name: var.get("value") for name, var in env.items() if "valueFrom" not in var}
    wanted = expected_s3_env(manifest_annotations)
    assert {k: got.get(k) for k in wanted} == wanted, (
        f"KServe did not give the storage initializer the object store of the manifests (it "
        f"would download from AWS): {got}"
    )
    (mlflow,) = one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    mlflow_env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert got["AWS_ENDPOINT_URL"] == mlflow_env["MLFLOW_S3_ENDPOINT_URL"]


def test_the_storage_initializer_downloads_from_the_object_store_the_secret_names(
    control_plane, s3, tmp_path
):
    """Another object store (moto here), set on the Secret: KServe's code downloads from it."""
    import boto3

    namespace = control_plane.namespace("download")
    bucket, prefix = "fineserve", f"{namespace}/artifacts/hf_model"
    files = {"config.json": b'{"num_labels": 3}', "model.safetensors": bytes(range(256)) * 64}
    store = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    for name, data in files.items():
        store.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)

    endpoint = s3["AWS_ENDPOINT_URL"].removeprefix("http://")
    objects = overlay(tmp_path / "overlay", namespace, {ENDPOINT: endpoint})
    secret = install_storage(control_plane.kubeconfig, namespace, objects)
    # the InferenceService the deploy step creates (storage_service_account: fineserve-storage)
    settings = PredictorSettings(
        image="registry.example/fineserve:1",
        storage_uri=f"s3://{bucket}/{prefix}",
        model_version="1",
        service_account=ACCOUNT,
    )
    cluster = Cluster(namespace=namespace, config_file=str(control_plane.kubeconfig))
    cluster.create(new_inference_service("download", namespace, STANDARD, "clf", settings))

    container = storage_initializer(control_plane, namespace, "download")
    env = plain_env(container, secret)
    assert env.get("AWS_ENDPOINT_URL") == s3["AWS_ENDPOINT_URL"], (
        f"the storage initializer would not download from the Secret's object store: {env}"
    )
    source, target = container["args"]
    assert source == settings.storage_uri
    downloaded = tmp_path / "mnt-models"
    # python/storage-initializer/scripts/initializer-entrypoint of KServe v0.20.0, with the
    # init container's arguments (its target folder mapped here) and nothing but its env
    entrypoint = textwrap.dedent(
        """
        import sys
        from kserve_storage import Storage
        Storage.download_files(sys.argv[1::2], sys.argv[2::2])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", entrypoint, source, str(downloaded)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the download from {source} failed:\n{done.stderr[-3000:]}"
    assert target == "/mnt/models"
    assert {p.name: p.read_bytes() for p in downloaded.iterdir()} == files
