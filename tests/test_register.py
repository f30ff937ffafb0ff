"""The register step against a real MLflow store (SQLite + local artifacts)."""

import json
import shutil

import mlflow
import pytest
from steps import register_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fineserve.core.artifacts import MODEL_INFO_FILE, PROBE_FILE, read_probe_texts
from fineserve.core.errors import DataError, RegistryError

RESULTS = {
    "label_names": ["negative", "neutral", "positive"],
    "test_rows": 30,
    "n_bootstrap": 100,
    "model": {
        "accuracy": 0.6,
        "macro_f1": 0.55,
        "precision": [0.5, 0.6, 0.7],
        "recall": [0.6, 0.5, 0.7],
        "f1": [0.55, 0.54, 0.7],
        "support": [10, 10, 10],
        "confusion_matrix": [[6, 3, 1], [3, 5, 2], [1, 2, 7]],
    },
    "confidence_intervals": {"accuracy": [0.43, 0.77], "macro_f1": [0.38, 0.72]},
    "baseline": None,
}


@pytest.fixture
def model_dir(tiny_classifier, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_classifier, target)
    info = {
        "base_model": "tiny-bert",
        "base_model_revision": "",
        "max_length": 64,
        "labels": RESULTS["label_names"],
        "device": "cpu",
        "precision": "fp32",
        "dataset": {"source": "corpus.csv", "fingerprint": "f" * 64, "rows": {"train": 240}},
        "hyperparameters": {"epochs": 0.0, "learning_rate": 1e-3, "seed": 42},
        "recipe": {"epochs": 12.5, "class_weighting": "balanced", "recipe_chose_epochs": True},
        "train_metrics": {"train_samples_per_second": 321.5, "train_loss": 1.01},
    }
    (target / MODEL_INFO_FILE).write_text(json.dumps(info))
    return target


@pytest.fixture
def evaluation(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "report.md").write_text("# fineserve evaluation\n")
    return str(tmp_path / "results.json"), str(tmp_path / "report.md")


def _register(model_dir, evaluation, tmp_path, run_id="run-1"):
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    outputs = register_model(
        str(model_dir),
        *evaluation,
        model_name="sentiment",
        pipeline_run_id=run_id,
        tracking_uri=tracking_uri,
        artifact_location=str(tmp_path / "artifacts"),
        image="example.org/fineserve:1",
    )
    return {**outputs, "tracking_uri": tracking_uri}


def test_registers_a_version_with_alias_tags_metrics_and_report(model_dir, evaluation, tmp_path):
    out = _register(model_dir, evaluation, tmp_path)
    client = mlflow.MlflowClient(out["tracking_uri"])
    version = client.get_model_version_by_alias("sentiment", "challenger")
    assert str(version.version) == out["model_version"] == "1"
    assert version.tags["fineserve.pipeline_run_id"] == "run-1"
    assert version.tags["fineserve.dataset_fingerprint"] == "f" * 64
    assert version.tags["fineserve.base_model"] == "tiny-bert"
    assert version.tags["fineserve.image"] == "example.org/fineserve:1"
    run = client.get_run(out["run_id"])
    assert run.data.metrics["macro_f1"] == 0.55
    assert run.data.metrics["macro_f1_ci_low"] == 0.38
    assert run.data.metrics["train_samples_per_second"] == 321.5
    assert run.data.params["learning_rate"] == "0.001"
    assert run.data.params["dataset_fingerprint"] == "f" * 64
    # what the recipe chose, beside what was asked (epochs 0: the recipe's)
    assert run.data.params["epochs"] == "0.0" and run.data.params["recipe_epochs"] == "12.5"
    assert run.data.params["recipe_class_weighting"] == "balanced"
    logged = {f.path for f in client.list_artifacts(out["run_id"], "evaluation")}
    assert logged == {
        "evaluation/report.md",
        "evaluation/results.json",
        "evaluation/confusion_matrix.png",
    }


def test_the_registered_directory_carries_the_probe_texts_and_precision_costs_are_logged(
    model_dir, tmp_path
):
    int8 = {"accuracy": 0.5, "macro_f1": 0.53, "agreement": 0.97, "max_probability_diff": 0.2}
    results = {**RESULTS, "probe_texts": ["a fine day", "awful"], "precisions": {"int8": int8}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "report.md").write_text("# fineserve evaluation\n")
    out = _register(model_dir, (str(tmp_path / "results.json"), str(tmp_path / "report.md")),
                    tmp_path)  # fmt: skip
    assert read_probe_texts(out["storage_uri"]) == ["a fine day", "awful"]
    assert not (model_dir / PROBE_FILE).exists()  # the train step's output is left as it was
    metrics = mlflow.MlflowClient(out["tracking_uri"]).get_run(out["run_id"]).data.metrics
    assert (metrics["int8_macro_f1"], metrics["int8_agreement"]) == (0.53, 0.97)


def test_storage_uri_is_a_directly_loadable_hf_directory(model_dir, evaluation, tmp_path):
    out = _register(model_dir, evaluation, tmp_path)
    assert out["storage_uri"].endswith("/artifacts/hf_model")
    model = AutoModelForSequenceClassification.from_pretrained(
        out["storage_uri"], use_safetensors=True
    )
    assert model.config.id2label[2] == "positive"
    assert AutoTokenizer.from_pretrained(out["storage_uri"]).is_fast


def test_the_version_loads_as_an_mlflow_pyfunc(model_dir, evaluation, tmp_path):
    out = _register(model_dir, evaluation, tmp_path)
    mlflow.set_tracking_uri(out["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/sentiment@challenger")
    predictions = model.predict(["what a great day", "this is awful"])
    assert list(predictions.columns) == ["label", "score"]
    assert set(predictions["label"]) <= {"negative", "neutral", "positive"}


def test_a_retried_step_reuses_its_run_and_version(model_dir, evaluation, tmp_path):
    first = _register(model_dir, evaluation, tmp_path)
    again = _register(model_dir, evaluation, tmp_path)
    assert again == first
    other = _register(model_dir, evaluation, tmp_path, run_id="run-2")
    assert other["model_version"] == "2" and other["run_id"] != first["run_id"]
    client = mlflow.MlflowClient(first["tracking_uri"])
    assert str(client.get_model_version_by_alias("sentiment", "challenger").version) == "2"


def test_refuses_a_model_name_that_is_a_uri(model_dir, evaluation, tmp_path):
    with pytest.raises(DataError, match="model_name must be a plain registry name"):
        register_model(str(model_dir), *evaluation, model_name="models:/x", pipeline_run_id="r")


def test_a_tracking_uri_mlflow_cannot_use_fails_naming_it(model_dir, evaluation, tmp_path):
    with pytest.raises(
        RegistryError, match=r"MLflow cannot use the tracking URI 'nosuchscheme://x'"
    ):
        register_model(
            str(model_dir),
            *evaluation,
            model_name="m",
            pipeline_run_id="r",
            tracking_uri="nosuchscheme://x",
        )
