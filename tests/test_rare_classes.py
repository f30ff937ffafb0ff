"""Rare classes kept in train: scored where the test split holds them, and named where not."""

import numpy as np
import pandas as pd
from steps import download_dataset, evaluate_model, tokenize_dataset, train_model

from fineserve.components.classification_metrics import (
    ClassificationReport,
    bootstrap_ci,
    paired_bootstrap_macro_f1,
)
from fineserve.components.evaluation import markdown_report, unscored_class_warnings
from fineserve.core.artifacts import summary_metrics


def test_macro_f1_is_the_mean_over_the_classes_the_test_split_holds():
    # class 2 (a rare class kept in train) has no test row and is never predicted
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 1, 1, 1])
    scores = ClassificationReport().compute(predictions=y_pred, references=y_true, num_labels=3)
    two_classes = ClassificationReport().compute(
        predictions=y_pred, references=y_true, num_labels=2
    )
    assert scores["macro_f1"] == two_classes["macro_f1"] == (0.8 + 6 / 7) / 2
    assert scores["support"] == [3, 3, 0]
    low, high = bootstrap_ci(y_true, y_pred, 3, n_resamples=200)["macro_f1"]
    assert (low, high) == bootstrap_ci(y_true, y_pred, 2, n_resamples=200)["macro_f1"]
    assert paired_bootstrap_macro_f1(y_true, y_true, y_pred, 3, n_resamples=50)[0] == (
        1 - scores["macro_f1"]
    )


def test_a_class_the_model_predicts_but_the_test_split_lacks_costs_the_classes_it_hides():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # one row of class 0 predicted as the untested class 2
    scores = ClassificationReport().compute(predictions=y_pred, references=y_true, num_labels=3)
    assert scores["macro_f1"] == (2 / 3 + 1) / 2  # class 0's recall pays for it
    assert scores["accuracy"] == 0.75


def _results(names, support):
    f1 = [0.9 if n else 0.0 for n in support]
    zeros = [[0] * len(names) for _ in names]
    model = {"accuracy": 0.9, "macro_f1": 0.9, "f1": f1, "support": support}
    model |= {"precision": f1, "recall": f1, "confusion_matrix": zeros}
    return {
        "label_names": names,
        "test_rows": sum(support),
        "n_bootstrap": 10,
        "model": model,
        "confidence_intervals": {"accuracy": (0.8, 1.0), "macro_f1": (0.8, 1.0)},
        "baseline": None,
    }


def test_classes_missing_from_the_test_split_are_named_with_their_train_rows():
    names = ["ABBR:abb", "DESC:def", "NUM:ord"]
    (warning,) = unscored_class_warnings(names, [0, 40, 0], {"ABBR:abb": 4, "NUM:ord": 2})
    assert warning == (
        "2 of 3 classes are not in the test split, so no score covers them: 'ABBR:abb' (4 train "
        "rows), 'NUM:ord' (2 train rows); rare classes, kept in train only (rare_classes=keep), "
        "the model predicts them untested: give a test split that holds them, or leave them out "
        "(rare_classes=drop)"
    )
    assert unscored_class_warnings(names, [5, 40, 3], {"NUM:ord": 2}) == []
    result = _results(names, [0, 40, 0])
    assert "| ABBR:abb | not in the test split | | | 0 |" in markdown_report(result)
    assert set(summary_metrics(result)) >= {"f1_DESC:def"}
    assert "f1_ABBR:abb" not in summary_metrics(result)  # no score, rather than a false 0


def test_evaluate_warns_about_rare_classes_and_scores_the_others(tiny_base_model, tmp_path):
    rng = np.random.default_rng(0)
    cues = {"sport": "match", "food": "recipe", "film": "actor", "tech": "laptop"}
    rare = {"ENTY:currency": 3, "NUM:ord": 2}
    rows = []
    for label, count in {**dict.fromkeys(cues, 40), **rare}.items():
        for _ in range(count):
            words = list(rng.choice(["the", "a", "day", "city", "road"], 5))
            rows.append({"text": " ".join([*words, cues.get(label, label)]), "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    meta = download_dataset(str(tmp_path / "d.csv"), str(tmp_path / "raw"))
    assert meta["rare_classes"]["classes"] == {"NUM:ord": 2, "ENTY:currency": 3}
    tokenize_dataset(
        str(tmp_path / "raw"), str(tmp_path / "tok"), base_model=str(tiny_base_model), max_length=16
    )
    train_model(
        str(tmp_path / "tok"),
        str(tmp_path / "m"),
        base_model=str(tiny_base_model),
        epochs=1.0,
        batch_size=16,
    )
    result = evaluate_model(
        str(tmp_path / "raw"),
        str(tmp_path / "m"),
        results_path=str(tmp_path / "r.json"),
        report_path=str(tmp_path / "r.md"),
        n_bootstrap=50,
        baseline=False,
        serving_precisions="none",
    )
    names = result["label_names"]
    assert names == ["ENTY:currency", "NUM:ord", "film", "food", "sport", "tech"]
    model = result["model"]
    assert model["support"][:2] == [0, 0]
    tested = [f1 for f1, n in zip(model["f1"], model["support"], strict=True) if n]
    assert result["model"]["macro_f1"] == np.mean(tested)
    assert any(
        "2 of 6 classes are not in the test split" in w
        and "'ENTY:currency' (3 train rows), 'NUM:ord' (2 train rows)" in w
        for w in result["warnings"]
    ), result["warnings"]
    assert not any(
        "the test split has only" in w and "of class 'ENTY" in w for w in result["warnings"]
    )
    assert "| NUM:ord | not in the test split |" in (tmp_path / "r.md").read_text()
