"""evaluate: score the trained model on the test split, against a TF-IDF baseline.

Predictions come from the serving engine (`serving.engine.TextClassifier`), so the scores are
those of the deployed predictor. Accuracy, macro-F1, per-class precision/recall/F1, the
confusion matrix and bootstrap 95% intervals come from `components.metrics` (an offline
`evaluate.Metric`); a Markdown report sums them up. The same metrics for TF-IDF + logistic
regression trained on the same train split tell whether the transformer earns its cost.
"""

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from components.errors import DataError
from components.kfp_wrapper import component

log = logging.getLogger(__name__)


def tfidf_baseline(train_texts: list[str], train_labels, test_texts: list[str], seed: int = 0):
    """Predictions of TF-IDF (word 1-2 grams) + logistic regression fit on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    baseline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    baseline.fit(train_texts, train_labels)
    return baseline.predict(test_texts)


def _markdown_report(result: dict[str, Any]) -> str:
    names = result["label_names"]
    model, base, ci = result["model"], result["baseline"], result["confidence_intervals"]
    lines = [
        "# fineserve evaluation",
        "",
        f"Test split: {result['test_rows']} rows. Intervals: {result['n_bootstrap']}-resample "
        "percentile bootstrap, 95%.",
        "",
        "| model | accuracy | macro-F1 |",
        "| --- | --- | --- |",
        f"| fine-tuned transformer | {model['accuracy']:.4f} "
        f"[{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}] | {model['macro_f1']:.4f} "
        f"[{ci['macro_f1'][0]:.4f}, {ci['macro_f1'][1]:.4f}] |",
    ]
    if base is not None:
        lines.append(
            f"| TF-IDF + logistic regression | {base['accuracy']:.4f} | {base['macro_f1']:.4f} |"
        )
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for i, name in enumerate(names):
        lines.append(
            f"| {name} | {model['precision'][i]:.4f} | {model['recall'][i]:.4f} | "
            f"{model['f1'][i]:.4f} | {model['support'][i]} |"
        )
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("| --- " * (len(names) + 1) + "|")
    for name, row in zip(names, model["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


def evaluate_model(
    dataset_dir: str,
    model_dir: str,
    *,
    results_path: str,
    report_path: str,
    n_bootstrap: int = 1000,
    baseline: bool = True,
    batch_size: int = 64,
    seed: int = 42,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on the test split of ``dataset_dir``; write results and report.

    Returns the results, also written as JSON to ``results_path``; the report goes to
    ``report_path``.
    """
    import datasets
    import numpy as np
    from transformers import AutoConfig

    from components.metrics import ClassificationReport, bootstrap_ci
    from serving.engine import TextClassifier

    data = datasets.load_from_disk(dataset_dir)
    label_names = data["test"].features["label"].names
    model_labels = AutoConfig.from_pretrained(model_dir).id2label
    if [model_labels[i] for i in range(len(model_labels))] != label_names:
        raise DataError(
            f"the model's labels {list(model_labels.values())} differ from the data's {label_names}"
        )
    test = data["test"]
    if len(test) == 0:
        raise DataError("the test split is empty")
    y_true = np.asarray(test["label"])
    # the serving engine itself: what is scored here is what the predictor answers
    classifier = TextClassifier(model_dir, max_batch_size=batch_size)
    y_pred = classifier.predict_proba(list(test["text"])).argmax(axis=-1)
    report = ClassificationReport()
    num_labels = len(label_names)
    result: dict[str, Any] = {
        "label_names": label_names,
        "test_rows": len(test),
        "n_bootstrap": n_bootstrap,
        "model": report.compute(predictions=y_pred, references=y_true, num_labels=num_labels),
        "confidence_intervals": bootstrap_ci(
            y_true, y_pred, num_labels, n_resamples=n_bootstrap, seed=seed
        ),
        "baseline": None,
    }
    if baseline:
        train = data["train"]
        base_pred = tfidf_baseline(
            list(train["text"]), list(train["label"]), list(test["text"]), seed=seed
        )
        result["baseline"] = report.compute(
            predictions=base_pred, references=y_true, num_labels=num_labels
        )
    for path, text in (
        (results_path, json.dumps(result, indent=2)),
        (report_path, _markdown_report(result)),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return result


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics a run is judged and compared by (KFP Metrics, MLflow metrics)."""
    model, ci = result["model"], result["confidence_intervals"]
    scalars = {
        "accuracy": model["accuracy"],
        "macro_f1": model["macro_f1"],
        "accuracy_ci_low": ci["accuracy"][0],
        "accuracy_ci_high": ci["accuracy"][1],
        "macro_f1_ci_low": ci["macro_f1"][0],
        "macro_f1_ci_high": ci["macro_f1"][1],
    }
    for name, f1 in zip(result["label_names"], model["f1"], strict=True):
        scalars[f"f1_{name}"] = f1
    if result["baseline"] is not None:
        scalars["baseline_accuracy"] = result["baseline"]["accuracy"]
        scalars["baseline_macro_f1"] = result["baseline"]["macro_f1"]
    return {name: round(float(value), 5) for name, value in scalars.items()}


@component
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    report: Output[Markdown],
    results: Output[Artifact],
    n_bootstrap: int = 1000,
    baseline: bool = True,
    batch_size: int = 64,
    seed: int = 42,
) -> NamedTuple("EvaluateOutputs", [("accuracy", float), ("macro_f1", float)]):
    """Evaluate the fine-tuned model on the test split.

    Args:
        dataset: Input DatasetDict from the download step (raw text: the model's own tokenizer
            is applied, as in serving).
        model: Input HF directory from the train step.
        n_bootstrap: Bootstrap resamples for the confidence intervals.
        baseline: Also fit and score TF-IDF + logistic regression on the same splits.
        batch_size: Inference batch size.
        seed: Seed for the bootstrap and the baseline.

    Returns:
        metrics: Output scalar metrics (accuracy, macro-F1, their 95% CIs, per-class F1,
            baseline scores).
        confusion_matrix: Output confusion matrix drawn by the Kubeflow UI.
        report: Output Markdown report (rendered in the Kubeflow UI, logged to MLflow).
        results: Output JSON with every number, for the register step.
        accuracy: Test accuracy of the model (for quality gates).
        macro_f1: Test macro-F1 of the model (for quality gates).
    """
    from collections import namedtuple

    from components.evaluation import evaluate_model, summary_metrics

    result = evaluate_model(
        dataset.path,
        model.path,
        results_path=results.path,
        report_path=report.path,
        n_bootstrap=n_bootstrap,
        baseline=baseline,
        batch_size=batch_size,
        seed=seed,
    )
    for name, value in summary_metrics(result).items():
        metrics.log_metric(name, value)
    confusion_matrix.log_confusion_matrix(
        result["label_names"], result["model"]["confusion_matrix"]
    )
    outputs = namedtuple("EvaluateOutputs", ["accuracy", "macro_f1"])
    return outputs(result["model"]["accuracy"], result["model"]["macro_f1"])
