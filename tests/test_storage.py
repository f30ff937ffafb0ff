"""Model locations KServe can read: checked by name, and fetched for real from an S3 API.

The real path: the register step logs to an S3 artifact root (moto's S3 server on 127.0.0.1),
KServe's own storage-initializer code (`kserve-storage`) downloads the version's directory
from the URI registration recorded, and the predictor starts from the download.
"""

import httpx
import pytest
from serving_helpers import ServerProcess, serve_module_argv, v2_body
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
