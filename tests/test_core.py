"""The core layer: the artifact contract's helpers and the MLflow registry operations."""

import json

import pytest

from fineserve.core import artifacts, registry
from fineserve.core.errors import DataError, RegistryError

NAME = "sentiment"


def test_contract_helpers_round_trip_and_name_a_missing_file(tmp_path):
    info: artifacts.ModelInfo = {"base_model": "b", "max_length": 64, "labels": ["a", "b"]}
    artifacts.write_model_info(tmp_path / "m", info)
    assert json.loads((tmp_path / "m" / "fineserve.json").read_text()) == info
    assert artifacts.read_model_info(tmp_path / "m") == info
    assert artifacts.read_model_info(tmp_path / "other", missing_ok=True) == {}
    with pytest.raises(DataError, match=r"other is not a fineserve model directory: .*json"):
        artifacts.read_model_info(tmp_path / "other")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.json").write_text("[1]")
    with pytest.raises(DataError, match=r"metadata.json must hold a JSON object, not list"):
        artifacts.read_dataset_metadata(tmp_path / "bad")
    assert artifacts.tokenizer_dir(tmp_path) == tmp_path / "tokenizer"


@pytest.fixture
def client(tmp_path, monkeypatch):
    """A client on a fresh SQLite registry holding model NAME with versions 1 and 2."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = registry.mlflow_client()
    client.create_registered_model(NAME)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    for _ in range(2):
        run = client.create_run(experiment)
        client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id)
    return client


def test_tracking_uri_is_the_flag_then_the_environment_then_the_local_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert registry.resolve_tracking_uri("http://flag:5000") == "http://flag:5000"
    assert registry.resolve_tracking_uri() == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert registry.resolve_tracking_uri().endswith("/mlflow.db")
    assert registry.resolve_tracking_uri().startswith("sqlite:///")


def test_aliases_get_set_and_delete(client):
    assert registry.get_alias(client, NAME, artifacts.CHAMPION) is None
    assert registry.get_alias(client, "no-such-model", artifacts.CHAMPION) is None
    registry.set_alias(client, NAME, artifacts.CHAMPION, "1")
    assert registry.get_alias(client, NAME, artifacts.CHAMPION) == "1"
    registry.set_alias(client, NAME, artifacts.CHAMPION, "2")
    assert registry.get_alias(client, NAME, artifacts.CHAMPION) == "2"
    registry.delete_alias(client, NAME, artifacts.CHAMPION)
    registry.delete_alias(client, NAME, artifacts.CHAMPION)  # not set: no error
    assert registry.get_alias(client, NAME, artifacts.CHAMPION) is None


def test_registry_uris_resolve_to_a_version_and_its_model_directory(client):
    registry.set_alias(client, NAME, artifacts.CHALLENGER, "2")
    assert registry.resolve_version(client, f"models:/{NAME}@challenger") == (NAME, "2")
    assert registry.resolve_version(client, f"models:/{NAME}/1") == (NAME, "1")
    assert registry.pin_registry_version(f"models:/{NAME}@challenger", client) == (
        f"models:/{NAME}/2",
        "2",
    )
    assert registry.pin_registry_version("/some/dir", client) == ("/some/dir", None)
    with pytest.raises(RegistryError, match=r"cannot resolve 'models:/sentiment@nope'.*nope"):
        registry.resolve_version(client, f"models:/{NAME}@nope")
    location = registry.model_dir_uri(client, NAME, "1")
    assert location.endswith("/model/artifacts/hf_model")
    client.set_model_version_tag(NAME, "1", artifacts.TAG_STORAGE_URI, "s3://bucket/v1/hf_model")
    assert registry.model_dir_uri(client, NAME, "1") == "s3://bucket/v1/hf_model"


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/m@champion", ("m", "champion", None)),
        ("models:/m/3", ("m", None, "3")),
        ("models:/m", ("m", None, None)),
    ],
)
def test_models_uris_parse_without_mlflow(uri, parsed):
    assert registry.parse_models_uri(uri) == parsed


def test_a_uri_that_is_not_a_registry_uri_is_refused():
    with pytest.raises(RegistryError, match=r"'runs:/x/model' is not a registry URI"):
        registry.parse_models_uri("runs:/x/model")
