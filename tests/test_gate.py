"""The gate: its rule, the paired bootstrap, and decisions against a real MLflow server."""

import json

import datasets
import mlflow
import numpy as np
import pytest
from steps import download_dataset, register_copy

from fineserve.components.classification_metrics import paired_bootstrap_macro_f1
from fineserve.components.decorator import call_component
from fineserve.components.gate import decide, gate
from fineserve.core import artifacts
from fineserve.serving.engine import TextClassifier

RULE = {"min_macro_f1": 0.5, "macro_f1_tolerance": 0.01}


def _champion(diff, low, high, f1=0.7, version="3"):
    return {
        "version": version,
        "labels_match": True,
        "macro_f1": f1,
        "diff": diff,
        "diff_low": low,
        "diff_high": high,
    }


@pytest.mark.parametrize(
    ("challenger_f1", "champion", "passed", "reason"),
    [
        (0.75, None, True, "no champion yet"),
        (0.45, None, False, "below min_macro_f1 0.5000"),
        (0.45, _champion(0.1, 0.05, 0.15), False, "below min_macro_f1"),  # threshold first
        (0.80, _champion(0.05, 0.02, 0.08), True, "lower bound is above -0.01"),
        (0.70, _champion(0.0, -0.008, 0.009), True, "lower bound is above -0.01"),
        (0.68, _champion(-0.02, -0.04, 0.0), False, "may be worse by more than 0.01"),
        (
            0.9,
            {"version": "3", "labels_match": False, "labels_reason": "no comparison is possible"},
            False,
            "no comparison is possible",
        ),
    ],
    ids=["no champion", "below threshold", "threshold first", "better", "within tolerance",
         "worse", "other labels"],
)  # fmt: skip
def test_the_gate_rule(challenger_f1, champion, passed, reason):
    decision = decide(challenger_f1, champion, **RULE)
    assert decision.passed is passed
    assert reason in decision.reason
    assert decision.numbers["challenger_macro_f1"] == challenger_f1


def test_paired_bootstrap_of_equal_and_of_better_predictions():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 500)
    noisy = np.where(rng.random(500) < 0.4, rng.integers(0, 3, 500), y_true)
    assert paired_bootstrap_macro_f1(y_true, noisy, noisy, 3) == (0.0, 0.0, 0.0)
    diff, low, high = paired_bootstrap_macro_f1(y_true, y_true, noisy, 3, n_resamples=500)
    assert 0 < low <= diff <= high <= 1


@pytest.fixture(scope="module")
def gate_setup(mlflow_server, tiny_classifier, small_corpus_csv, tmp_path_factory):
    """A dataset, and the tiny classifier registered as v1 of two models on a real server."""
    root = tmp_path_factory.mktemp("gate")
    download_dataset(str(small_corpus_csv), str(root / "data"), seed=0)
    test = datasets.load_from_disk(str(root / "data"))["test"]
    label_names = test.features["label"].names
    assert (
        label_names
        == ["negative", "neutral", "positive"]
        == TextClassifier(tiny_classifier, device="cpu").labels
    )
    y_true = np.asarray(test["label"])
    champion = TextClassifier(tiny_classifier, device="cpu").predict_proba(list(test["text"]))
    return {
        "root": root,
        "y_true": y_true,
        "champion_predictions": champion.argmax(-1),
        "label_names": label_names,
    }


def _register(setup, tmp_path, tracking_uri, name, model_dir, run_id) -> str:
    """Register a copy of ``model_dir`` as a new version of ``name``; the version."""
    return register_copy(
        model_dir,
        tmp_path,
        model_name=name,
        pipeline_run_id=f"{name}-{run_id}",  # one MLflow run per registration on the server
        tracking_uri=tracking_uri,
    )["model_version"]


def _run_gate(setup, tmp_path, tracking_uri, name, version, predictions, **rule):
    from fineserve.components.classification_metrics import ClassificationReport

    y_true = setup["y_true"]
    model = ClassificationReport().compute(predictions=predictions, references=y_true, num_labels=3)
    results = {
        "label_names": setup["label_names"],
        "test_rows": len(y_true),
        "n_bootstrap": 200,
        "model": model,
        "confidence_intervals": {"accuracy": [0, 1], "macro_f1": [0, 1]},
        "baseline": None,
        "predictions": [int(p) for p in predictions],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    call = call_component(
        gate,
        dataset=setup["root"] / "data",
        results=tmp_path / "results.json",
        report=tmp_path / "gate.md",
        model_name=name,
        challenger_version=version,
        tracking_uri=tracking_uri,
        n_bootstrap=200,
        **rule,
    )
    return call, model["macro_f1"]


@pytest.mark.parametrize(
    ("challenger", "passed", "reason"),
    [
        ("truth", True, "lower bound is above -0.01"),
        ("champion", True, "lower bound is above -0.01"),
        ("worse", False, "may be worse by more than 0.01"),
    ],
)
def test_gate_against_a_champion_on_a_real_mlflow_server(
    gate_setup, mlflow_server, tiny_classifier, tmp_path, challenger, passed, reason
):
    name = f"gate-{challenger}"
    champion = _register(gate_setup, tmp_path, mlflow_server, name, tiny_classifier, "run-1")
    client = mlflow.MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, artifacts.CHAMPION, champion)
    version = _register(gate_setup, tmp_path, mlflow_server, name, tiny_classifier, "run-2")
    y_true, champion_predictions = gate_setup["y_true"], gate_setup["champion_predictions"]
    predictions = {
        "truth": y_true,
        "champion": champion_predictions,
        # the champion's answers, with every one it got right made wrong
        "worse": np.where(champion_predictions == y_true, (y_true + 1) % 3, champion_predictions),
    }[challenger]
    call, challenger_f1 = _run_gate(
        gate_setup, tmp_path, mlflow_server, name, version, predictions, min_macro_f1=0.0
    )
    assert call.outputs.passed is passed, call.outputs.reason
    assert reason in call.outputs.reason
    tags = client.get_model_version(name, version).tags
    assert tags[artifacts.TAG_GATE_PASSED] == str(passed).lower()
    assert tags[artifacts.TAG_GATE_REASON] == call.outputs.reason
    assert tags["fineserve.gate.champion_version"] == champion
    assert float(tags["fineserve.gate.challenger_macro_f1"]) == pytest.approx(challenger_f1)
    metrics = call.artifacts["metrics"].metadata
    assert metrics["passed"] == float(passed)
    assert metrics["diff_low"] <= metrics["diff"] <= metrics["diff_high"]
    report = (tmp_path / "gate.md").read_text()
    assert ("**passed**" if passed else "**failed**") in report and call.outputs.reason in report


def test_gate_with_no_champion_decides_on_the_threshold(
    gate_setup, mlflow_server, tiny_classifier, tmp_path
):
    name = "gate-first"
    version = _register(gate_setup, tmp_path, mlflow_server, name, tiny_classifier, "run-1")
    y_true = gate_setup["y_true"]
    passed, _ = _run_gate(gate_setup, tmp_path, mlflow_server, name, version, y_true)
    assert passed.outputs.passed and "no champion yet" in passed.outputs.reason
    low = (y_true + 1) % 3  # every row wrong: macro-F1 0
    failed, _ = _run_gate(gate_setup, tmp_path, mlflow_server, name, version, low, min_macro_f1=0.5)
    assert not failed.outputs.passed and "below min_macro_f1 0.5000" in failed.outputs.reason


def test_gate_refuses_a_champion_with_other_labels(
    gate_setup, mlflow_server, tiny_classifier, tmp_path
):
    import shutil

    from transformers import AutoConfig

    other = tmp_path / "other-labels"
    shutil.copytree(tiny_classifier, other)
    config = AutoConfig.from_pretrained(other)
    config.id2label = {0: "bad", 1: "meh", 2: "good"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.save_pretrained(other)
    name = "gate-labels"
    champion = _register(gate_setup, tmp_path, mlflow_server, name, other, "run-1")
    mlflow.MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", champion)
    version = _register(gate_setup, tmp_path, mlflow_server, name, tiny_classifier, "run-2")
    call, _ = _run_gate(gate_setup, tmp_path, mlflow_server, name, version, gate_setup["y_true"])
    assert not call.outputs.passed
    assert "['bad', 'meh', 'good']" in call.outputs.reason
    assert "no comparison is possible" in call.outputs.reason
