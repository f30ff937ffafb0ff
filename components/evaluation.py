"""evaluate: score the trained model on the test split, against a TF-IDF baseline.

Predictions come from the serving engine (`fineserve.serving.engine.TextClassifier`), so the
scores are those of the deployed predictor. Accuracy, macro-F1, per-class precision/recall/F1,
the confusion matrix and bootstrap 95% intervals come from
`fineserve.components.classification_metrics` (an offline
`evaluate.Metric`); a Markdown report sums them up. The same metrics for TF-IDF + logistic
regression trained on the same train split tell whether the transformer earns its cost.
"""

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

from fineserve.components.decorator import component
from fineserve.core.artifacts import LABEL_COLUMN, TEXT_COLUMN, EvaluationResults
from fineserve.core.errors import DataError, shown

log = logging.getLogger(__name__)


def tfidf_baseline(dataset_dir: str, test_texts: list[str], seed: int = 0):
    """Predictions of TF-IDF (word 1-2 grams) + logistic regression fit on the train split."""
    import datasets
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    baseline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    train = datasets.load_from_disk(dataset_dir)["train"]
    baseline.fit(list(train[TEXT_COLUMN]), list(train[LABEL_COLUMN]))
    return baseline.predict(test_texts)


def write_report(path: str, result: EvaluationResults) -> None:
    """Write the Markdown report of ``result`` to ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown_report(result))


def recipe_line(recipe: dict[str, Any]) -> str:
    """What the train step's recipe chose, in a line."""
    every = recipe.get("validate_every")  # absent in models from before it existed
    validation = f"; validation every {every} updates" if every else ""
    return (
        f"{recipe['why']}; learning rate {recipe['learning_rate']:g}; class weighting "
        f"{recipe['class_weighting']}; early-stopping patience {recipe['early_stopping_patience']}"
        + validation
    )


def markdown_report(result: EvaluationResults) -> str:
    """The evaluation as a Markdown report (rendered in the Kubeflow UI, logged to MLflow)."""
    names = result["label_names"]
    model, base, ci = result["model"], result["baseline"], result["confidence_intervals"]
    lines = [
        "# fineserve evaluation",
        "",
        f"Test split: {result['test_rows']} rows. Intervals: {result['n_bootstrap']}-resample "
        "percentile bootstrap, 95%.",
        "",
        *(f"> **Warning:** {warning}\n" for warning in result.get("warnings", [])),
        *(
            [f"Training recipe: {recipe_line(result['recipe'])}.", ""]
            if result.get("recipe")
            else []
        ),
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
    if result.get("precisions"):
        lines += ["", "## Serving precisions (against float32, same test split)", ""]
        lines += ["| precision | macro-F1 | change | classes kept | largest probability move |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for name, scores in result["precisions"].items():
            lines.append(
                f"| {name} | {scores['macro_f1']:.4f} | "
                f"{scores['macro_f1'] - model['macro_f1']:+.4f} | {scores['agreement']:.2%} | "
                f"{scores['max_probability_diff']:.3g} |"
            )
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for i, name in enumerate(names):
        if not model["support"][i]:
            lines.append(f"| {name} | not in the test split | | | 0 |")
            continue
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


def load_test_split(dataset_dir: str, model_dir: str):
    """The test split of ``dataset_dir`` and its label names, checked against the model's."""
    import datasets
    from transformers import AutoConfig

    from fineserve.serving import pooling  # noqa: F401  (the mean-pooling head's config type)

    test = datasets.load_from_disk(dataset_dir)["test"]
    label_names = test.features[LABEL_COLUMN].names
    model_labels = AutoConfig.from_pretrained(model_dir).id2label
    if [model_labels[i] for i in range(len(model_labels))] != label_names:
        raise DataError(
            f"the model's labels {list(model_labels.values())} differ from the data's {label_names}"
        )
    if len(test) == 0:
        raise DataError("the test split is empty")
    return test, label_names


#: Below these, a test split's scores (and their bootstrap intervals) say little.
MIN_TEST_ROWS, MIN_TEST_ROWS_PER_CLASS = 100, 10


def small_test_split_warnings(label_names: list[str], support: list[int]) -> list[str]:
    """Why the scores of a test split this small may mean little (empty when they do not)."""
    rows = sum(support)
    scored = [i for i, n in enumerate(support) if n] or list(range(len(support)))
    smallest = min(scored, key=support.__getitem__)
    if rows >= MIN_TEST_ROWS and support[smallest] >= MIN_TEST_ROWS_PER_CLASS:
        return []
    return [
        f"the test split has only {rows} rows ({support[smallest]} of class "
        f"{label_names[smallest]!r}): its scores and intervals say little; use at least "
        f"{MIN_TEST_ROWS} rows and {MIN_TEST_ROWS_PER_CLASS} per class (max_eval_samples, "
        "test_fraction)"
    ]


def unscored_class_warnings(
    label_names: list[str], support: list[int], rare: dict[str, int] | None
) -> list[str]:
    """A warning naming the classes the test split does not hold: nothing scores them.

    ``rare``: the download step's rare classes (name: train rows), to say why they are missing.
    """
    missing = [name for name, n in zip(label_names, support, strict=True) if n == 0]
    if not missing:
        return []
    rare = rare or {}
    named = ", ".join(
        shown(name, 40) + (f" ({rare[name]} train rows)" if name in rare else "")
        for name in missing[:20]
    ) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
    why = (
        "rare classes, kept in train only (rare_classes=keep)"
        if all(name in rare for name in missing)
        else "the test split has no row of them"
    )
    return [
        f"{len(missing)} of {len(label_names)} classes are not in the test split, so no score "
        f"covers them: {named}; {why}, the model predicts them untested: give a test split "
        "that holds them, or leave them out (rare_classes=drop)"
    ]


def missed_class_warnings(
    label_names: list[str], model: dict[str, Any], baseline: dict[str, Any] | None
) -> list[str]:
    """A warning for each class the model never gets right (F1 0) on the test split."""
    warnings = []
    for index, (name, f1) in enumerate(zip(label_names, model["f1"], strict=True)):
        if f1 > 0 or model["support"][index] == 0:
            continue
        versus = f" (TF-IDF + LR: {baseline['f1'][index]:.2f})" if baseline else ""
        warnings.append(
            f"class {name!r} scored F1 0.00{versus}: the model never predicts it right; train "
            "more updates (min_updates, epochs), keep class_weighting=balanced, or add rows"
        )
    return warnings


def predict_proba(model_dir: str, texts: list[str], batch_size: int, precision: str = "float32"):
    """Probabilities the serving engine answers in ``precision`` (no probe: scored in full)."""
    from fineserve.serving.engine import TextClassifier
    from fineserve.serving.precision import ProbeSettings

    classifier = TextClassifier(
        model_dir,
        device="cpu" if precision == "int8" else "auto",
        dtype=precision,
        max_batch_size=batch_size,
        probe=ProbeSettings(texts=0),
    )
    return classifier.predict_proba(texts)


#: Reduced precisions the evaluate step can score against float32.
REDUCED_PRECISIONS = ("bfloat16", "float16", "int8")


def precisions_to_score(precisions: str) -> list[str]:
    """The reduced precisions named by the ``serving_precisions`` parameter.

    auto: int8, and bfloat16 where this machine runs it natively (what `--dtype auto` serves);
    none: no other precision; else a comma-separated list.
    """
    import torch

    from fineserve.serving.precision import native_bf16

    if precisions == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return ["bfloat16", "int8"] if native_bf16(device) else ["int8"]
    if precisions in ("none", ""):
        return []
    names = [name.strip() for name in precisions.split(",")]
    unknown = [name for name in names if name not in REDUCED_PRECISIONS]
    if unknown:
        raise DataError(
            f"serving_precisions: unknown {unknown}; use auto, none or some of {REDUCED_PRECISIONS}"
        )
    return names


def score_precision(reference, candidate, y_true, num_labels: int) -> dict[str, float]:
    """A reduced precision's test scores and how far it moved from float32's answers."""
    from fineserve.components.classification_metrics import ClassificationReport

    y_pred = candidate.argmax(axis=-1)
    scores = ClassificationReport().compute(
        predictions=y_pred, references=y_true, num_labels=num_labels
    )
    return {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "agreement": float((y_pred == reference.argmax(axis=-1)).mean()),
        "max_probability_diff": float(abs(candidate - reference).max()),
    }


#: Test texts stored with a registered model for the predictor's precision probe.
PROBE_TEXTS = 256


def probe_texts(texts: list[str], labels, seed: int, limit: int = PROBE_TEXTS) -> list[str]:
    """Up to ``limit`` test texts, taking each class in turn (a seeded order within each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(int(queue.pop()))
    return [texts[i] for i in chosen]


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
    serving_precisions: str = "auto",
) -> NamedTuple("EvaluateOutputs", [("accuracy", float), ("macro_f1", float)]):
    """Evaluate the fine-tuned model on the test split.

    Args:
        dataset: Input DatasetDict from the download step (raw text: the model's own tokenizer
            is applied, as in serving).
        model: Input HF directory from the train step.
        n_bootstrap: Bootstrap resamples for the confidence intervals.
        baseline: Also fit and score TF-IDF + logistic regression on the same splits.
        batch_size: Inference batch size.
        seed: Seed for the bootstrap, the baseline and the probe texts.
        serving_precisions: Reduced serving precisions also scored, each against float32 (macro-F1,
            class agreement): auto (int8, and bfloat16 where this machine runs it
            natively), none, or a comma-separated list of bfloat16, float16, int8.

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

    import numpy as np

    from fineserve.components import evaluation as step
    from fineserve.components.classification_metrics import ClassificationReport, bootstrap_ci
    from fineserve.core import artifacts

    reduced = step.precisions_to_score(serving_precisions)
    test, label_names = step.load_test_split(dataset.path, model.path)
    texts, y_true = list(test[artifacts.TEXT_COLUMN]), np.asarray(test[artifacts.LABEL_COLUMN])
    probabilities = step.predict_proba(model.path, texts, batch_size)
    y_pred = probabilities.argmax(axis=-1)
    report_metric, num_labels = ClassificationReport(), len(label_names)
    result: artifacts.EvaluationResults = {
        "label_names": label_names,
        "test_rows": len(test),
        "n_bootstrap": n_bootstrap,
        "model": report_metric.compute(
            predictions=y_pred, references=y_true, num_labels=num_labels
        ),
        "confidence_intervals": bootstrap_ci(
            y_true, y_pred, num_labels, n_resamples=n_bootstrap, seed=seed
        ),
        "baseline": None,
        "predictions": [int(p) for p in y_pred],
        "precisions": {
            name: step.score_precision(
                probabilities,
                step.predict_proba(model.path, texts, batch_size, name),
                y_true,
                num_labels,
            )
            for name in reduced
        },
        "probe_texts": step.probe_texts(texts, y_true, seed),
    }
    support = result["model"]["support"]
    rare = artifacts.read_dataset_metadata(dataset.path).get("rare_classes") or {}
    result["warnings"] = step.small_test_split_warnings(label_names, support)
    result["warnings"] += step.unscored_class_warnings(label_names, support, rare.get("classes"))
    for warning in result["warnings"]:
        step.log.warning(warning)
    if baseline:
        base_pred = step.tfidf_baseline(dataset.path, texts, seed=seed)
        result["baseline"] = report_metric.compute(
            predictions=base_pred, references=y_true, num_labels=num_labels
        )
    missed = step.missed_class_warnings(label_names, result["model"], result["baseline"])
    for warning in missed:
        step.log.warning(warning)
    result["warnings"] += missed
    recipe = artifacts.read_model_info(model.path, missing_ok=True).get("recipe")
    if recipe:
        result["recipe"] = recipe
    artifacts.write_evaluation_results(results.path, result)
    step.write_report(report.path, result)
    for name, value in artifacts.summary_metrics(result).items():
        metrics.log_metric(name, value)
    confusion_matrix.log_confusion_matrix(label_names, result["model"]["confusion_matrix"])
    outputs = namedtuple("EvaluateOutputs", ["accuracy", "macro_f1"])
    return outputs(result["model"]["accuracy"], result["model"]["macro_f1"])
