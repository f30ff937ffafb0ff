"""Model locations KServe can read: checked by name, and fetched for real from an S3 API.

The real path: the register step logs to an S3 artifact root (moto's S3 server on 127.0.0.1),
KServe's own storage-initializer code (`kserve-storage`) downloads the version's directory
from the URI registration recorded, and the predictor starts from the download.
"""

import subprocess
import sys
import time

import httpx
import pytest
from serving_helpers import ServerProcess, free_port, serve_module_argv, v2_body
from steps import register_copy

from fineserve.core.errors import RegistryError
from fineserve.core.storage import check_storage_uri


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/1/artifacts/hf_model",
        "gs://bucket/m",
        "pvc://models-pvc/m",
        "hf://org/model",
        "https://acct.blob.core.windows.net/models/m",
    ],
)
def test_locations_kserve_reads_are_accepted(uri):
    assert check_storage_uri(uri) == uri


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("mlflow-artifacts:/1/abc/artifacts/model/artifacts/hf_model", "proxied by the MLflow"),
        ("models:/m@champion", "an MLflow URI"),
        ("https://example.org/models/m", "single files, not a model directory"),
        ("/home/me/mlartifacts/1/m", "a path on this machine"),
        ("file:///tmp/m", "a path on this machine"),
    ],
)
def test_locations_kserve_cannot_read_are_refused_saying_what_to_configure(uri, why):
    with pytest.raises(RegistryError, match="KServe cannot read the model location") as refused:
        check_storage_uri(uri)
    assert why in str(refused.value)
    assert "--default-artifact-root s3://" in str(refused.value)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Moto's S3 API on 127.0.0.1 with a bucket `fineserve`; its environment for clients."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,  # kserve-storage
        "MLFLOW_S3_ENDPOINT_URL": url,  # MLflow
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "moto did not start"
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     ).create_bucket(Bucket="fineserve")  # fmt: skip
        yield env
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_version_on_a_proxying_mlflow_server_is_refused(mlflow_server, tiny_classifier, tmp_path):
    outputs = register_copy(
        tiny_classifier,
        tmp_path,
        model_name="on-s3",
        pipeline_run_id=f"storage-{tmp_path.name}",  # its own MLflow run on a shared server
        tracking_uri=mlflow_server,
    )
    assert outputs["storage_uri"].startswith("mlflow-artifacts:/")
    with pytest.raises(RegistryError, match="proxied by the MLflow server"):
        check_storage_uri(outputs["storage_uri"])


def test_a_registered_version_is_fetched_from_s3_by_kserve_storage_and_served(
    s3, tiny_classifier, tmp_path, monkeypatch
):
    from kserve_storage import Storage

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    outputs = register_copy(
        tiny_classifier,
        tmp_path,
        model_name="on-s3",
        pipeline_run_id="run-1",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_location="s3://fineserve/mlartifacts",
    )
    uri = check_storage_uri(outputs["storage_uri"])
    assert uri.startswith("s3://fineserve/mlartifacts/") and uri.endswith("/artifacts/hf_model")

    downloaded = Storage.download(uri, str(tmp_path / "mnt-models"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "fineserve.json"):
        assert (tmp_path / "mnt-models" / name).read_bytes() == (
            outputs["model_dir"] / name
        ).read_bytes()

    argv = serve_module_argv(downloaded, "on-s3", "--device", "cpu")
    with ServerProcess(argv, log_path=tmp_path / "server.log") as server:
        response = httpx.post(
            f"{server.url}/v2/models/on-s3/infer", json=v2_body(["a fine day"]), timeout=30
        )
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["label", "label_id", "probabilities"]
