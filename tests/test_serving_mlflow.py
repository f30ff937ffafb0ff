"""Model URIs resolved through a real local MLflow registry, and `fineserve serve --model-uri`."""

from __future__ import annotations

import sys

import httpx
import pytest
from serving_helpers import ServerProcess, v2_body

from fineserve.core.registry import pin_registry_version
from fineserve.serving.engine import TextClassifier
from fineserve.serving.model_uri import resolve_model_dir

NAME = "fineserve-tiny"


@pytest.fixture(scope="module")
def registered_model(tiny_classifier, tmp_path_factory):
    """A real local MLflow registry holding the tiny model as the register step logs it."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    class Wrapper(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.hf_dir = context.artifacts["hf_model"]

        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking_utils, "_tracking_uri", uri)
        experiment = mlflow.create_experiment("serving", artifact_location=str(root / "art"))
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.pyfunc.log_model(
                name="model",
                python_model=Wrapper(),
                artifacts={"hf_model": str(tiny_classifier)},
                registered_model_name=NAME,
                pip_requirements=["transformers"],
            )
        client = MlflowClient(tracking_uri=uri)
        client.set_registered_model_alias(NAME, "champion", "1")
        yield {"uri": uri, "run_id": run.info.run_id, "name": NAME}


@pytest.mark.parametrize(
    "model_uri", ["models:/fineserve-tiny@champion", "models:/fineserve-tiny/1"]
)
def test_resolve_registered_model_downloads_the_hf_dir(
    registered_model, tiny_classifier, model_uri
):
    hf_dir = resolve_model_dir(model_uri)
    assert hf_dir.parent.name == "artifacts" and (hf_dir.parent.parent / "MLmodel").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (hf_dir / name).read_bytes() == (tiny_classifier / name).read_bytes()
    assert TextClassifier(hf_dir, device="cpu").labels == ["negative", "neutral", "positive"]


def test_resolve_run_uri(registered_model):
    hf_dir = resolve_model_dir(f"runs:/{registered_model['run_id']}/model")
    assert (hf_dir / "config.json").is_file()


def test_resolve_into_a_chosen_directory(registered_model, tmp_path):
    hf_dir = resolve_model_dir("models:/fineserve-tiny@champion", dst=str(tmp_path / "dl"))
    assert hf_dir.is_relative_to(tmp_path / "dl")
    assert (hf_dir / "config.json").is_file()


def test_registry_uris_are_pinned_to_the_version_they_name(registered_model, tmp_path):
    assert pin_registry_version(f"models:/{NAME}@champion") == (f"models:/{NAME}/1", "1")
    assert pin_registry_version(f"models:/{NAME}/1") == (f"models:/{NAME}/1", "1")
    run_uri = f"runs:/{registered_model['run_id']}/model"
    assert pin_registry_version(run_uri) == (run_uri, None)
    assert pin_registry_version(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(Exception, match="nope"):
        pin_registry_version(f"models:/{NAME}@nope")


def test_resolve_unknown_alias_fails(registered_model):
    with pytest.raises(Exception, match="nope"):
        resolve_model_dir(f"models:/{NAME}@nope")


class FineserveServe(ServerProcess):
    """`fineserve serve` as the console script wires it: add_serve_arguments + run_serve."""

    def port_args(self) -> list[str]:
        return ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]


_FINESERVE_SERVE = (
    "import argparse, sys\n"
    "from fineserve.serving.entrypoint import add_serve_arguments, run_serve\n"
    "parser = argparse.ArgumentParser(prog='fineserve serve')\n"
    "add_serve_arguments(parser)\n"
    "run_serve(parser.parse_args(sys.argv[1:]))\n"
)


def test_fineserve_serve_model_uri(registered_model, tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the --tracking-uri option must be enough
    argv = [
        sys.executable,
        "-c",
        _FINESERVE_SERVE,
        "--model-uri",
        f"models:/{NAME}@champion",
        "--tracking-uri",
        registered_model["uri"],
        "--max-batch-size",
        "4",
    ]
    with FineserveServe(argv, log_path=tmp_path / "serve.log") as server:
        response = httpx.post(
            f"{server.url}/v2/models/{NAME}/infer", json=v2_body(["a fine day"]), timeout=30
        )
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert response.json()["model_version"] == "1"  # the version @champion points at
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        info = (
            f'fineserve_model_info{{device="cpu",model_name="{NAME}",model_version="1",'
            'precision="float32"} 1.0'
        )
        assert info in metrics
    expected = TextClassifier(tiny_classifier, device="cpu").predict_proba(["a fine day"])[0]
    assert outputs["probabilities"]["data"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert outputs["label"]["data"] == [expected_label(expected)]


def expected_label(probs) -> str:
    return ["negative", "neutral", "positive"][int(probs.argmax())]


def test_fineserve_serve_with_an_unknown_alias_says_so(registered_model, capsys):
    from fineserve.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "serve",
                "--model-uri",
                f"models:/{NAME}@nope",
                "--tracking-uri",
                registered_model["uri"],
            ]
        )
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"fineserve serve: cannot resolve 'models:/{NAME}@nope' in the registry" in error
    assert "Traceback" not in error
