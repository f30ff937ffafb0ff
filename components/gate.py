"""gate: should the model this run registered replace the champion? Decided on paired scores.

The challenger's test-split predictions come from the evaluate step; the current `champion`
(an MLflow alias) is downloaded and scored on the same rows with the serving engine. The gate
passes when the challenger meets the absolute threshold (`min_macro_f1`) and, if there is a
champion, the lower bound of the 95% paired-bootstrap interval of (challenger - champion)
macro-F1 is above `-macro_f1_tolerance`. Champions with other labels cannot be compared: the
gate fails and says so. The decision and its numbers are tagged on the challenger's version,
logged as KFP Metrics and written as a Markdown report.
"""

import logging
from typing import Any, NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from fineserve.components.decorator import component

log = logging.getLogger(__name__)


class Decision(NamedTuple):
    """What the gate decided, and the numbers it decided on."""

    passed: bool
    reason: str
    numbers: dict[str, Any]


def decide(
    challenger_f1: float,
    champion: dict[str, Any] | None,
    *,
    min_macro_f1: float,
    macro_f1_tolerance: float,
) -> Decision:
    """The gate's rule, on the challenger's macro-F1 and the champion comparison (if any).

    ``champion``: None when there is none; else its `version`, `labels_match`, and (when the
    labels match) `macro_f1` and the paired difference `diff`, `diff_low`, `diff_high`.
    """
    numbers: dict[str, Any] = {"challenger_macro_f1": challenger_f1}
    if challenger_f1 < min_macro_f1:
        return Decision(
            False,
            f"challenger macro-F1 {challenger_f1:.4f} is below min_macro_f1 {min_macro_f1:.4f}",
            numbers,
        )
    if champion is None:
        return Decision(True, "no champion yet: the absolute threshold decides", numbers)
    numbers["champion_version"] = champion["version"]
    if not champion["labels_match"]:
        return Decision(False, champion["labels_reason"], numbers)
    numbers.update({k: champion[k] for k in ("macro_f1", "diff", "diff_low", "diff_high")})
    numbers["champion_macro_f1"] = numbers.pop("macro_f1")
    interval = f"[{champion['diff_low']:+.4f}, {champion['diff_high']:+.4f}]"
    if champion["diff_low"] > -macro_f1_tolerance:
        return Decision(
            True,
            f"challenger - champion v{champion['version']} macro-F1 {champion['diff']:+.4f}, "
            f"95% interval {interval}: its lower bound is above -{macro_f1_tolerance:g}",
            numbers,
        )
    return Decision(
        False,
        f"challenger - champion v{champion['version']} macro-F1 {champion['diff']:+.4f}, 95% "
        f"interval {interval}: it may be worse by more than {macro_f1_tolerance:g}",
        numbers,
    )


def current_champion(
    client, model_name: str, *, inference_service: str, namespace: str, kube_context: str
) -> tuple[str | None, str]:
    """The version to compare against, and a note when the registry had it wrong.

    With a cluster (a named kube context, or running in one), the version the InferenceService
    serves to all traffic is the champion: a promotion done with kubectl alone is caught up
    here, `champion` and `previous` moved to match. Without one, MLflow's `champion` alias.
    """
    from fineserve.core import registry, rollout
    from fineserve.core.artifacts import CHAMPION
    from fineserve.core.cluster import Cluster, cluster_available
    from fineserve.core.inference_service import read_rollout

    alias = registry.get_alias(client, model_name, CHAMPION)
    if not (inference_service and cluster_available(kube_context)):
        return alias, ""
    found = Cluster(context=kube_context, namespace=namespace).get(inference_service)
    if found is None:
        return alias, ""
    state = read_rollout(found)
    served = state.served_version if state.model_name == model_name else None
    if served is None or served == alias:
        return alias, ""
    rollout.move_champion(client, model_name, served, alias)
    return served, (
        f"MLflow's champion was {'v' + alias if alias else 'unset'} but InferenceService "
        f"{inference_service!r} serves v{served} to all traffic: champion moved to v{served}"
    )


def compare_with_champion(
    client,
    model_name: str,
    version: str | None,
    dataset_dir: str,
    challenger_predictions: list[int],
    **bootstrap,
) -> dict[str, Any] | None:
    """Score champion ``version`` on the test split and compare it with the challenger (paired).

    ``bootstrap``: `n_resamples` and `seed` of the paired bootstrap. None when ``version`` is.
    """
    import datasets
    import numpy as np
    from transformers import AutoConfig

    from fineserve.components.classification_metrics import (
        ClassificationReport,
        paired_bootstrap_macro_f1,
    )
    from fineserve.core import artifacts, registry
    from fineserve.serving.engine import TextClassifier
    from fineserve.serving.model_uri import resolve_model_dir

    if version is None:
        return None
    test = datasets.load_from_disk(dataset_dir)["test"]
    label_names = test.features[artifacts.LABEL_COLUMN].names
    model_dir = resolve_model_dir(registry.model_dir_uri(client, model_name, version))
    id2label = AutoConfig.from_pretrained(model_dir).id2label
    champion_labels = [id2label[i] for i in range(len(id2label))]
    if champion_labels != label_names:
        return {
            "version": version,
            "labels_match": False,
            "labels_reason": (
                f"champion v{version} classifies into {champion_labels}, the challenger into "
                f"{label_names}: no comparison is possible; promote by hand if intended"
            ),
        }
    texts = list(test[artifacts.TEXT_COLUMN])
    # float32, as the evaluate step scored the challenger: the comparison is of the models
    champion = TextClassifier(model_dir, dtype="float32")
    champion_predictions = champion.predict_proba(texts).argmax(axis=-1)
    y_true = np.asarray(test[artifacts.LABEL_COLUMN])
    diff, low, high = paired_bootstrap_macro_f1(
        y_true,
        np.asarray(challenger_predictions),
        champion_predictions,
        len(label_names),
        **bootstrap,
    )
    champion_f1 = ClassificationReport().compute(
        predictions=champion_predictions, references=y_true, num_labels=len(label_names)
    )["macro_f1"]
    return {
        "version": version,
        "labels_match": True,
        "macro_f1": float(champion_f1),
        "diff": diff,
        "diff_low": low,
        "diff_high": high,
    }


def tag_version(client, model_name: str, version: str, decision: Decision) -> None:
    """Tag the decision, its reason and its numbers on the challenger's version."""
    from fineserve.core import artifacts

    tags = {
        artifacts.TAG_GATE_PASSED: str(decision.passed).lower(),
        artifacts.TAG_GATE_REASON: decision.reason,
        **{f"{artifacts.TAG_GATE_PREFIX}{k}": str(v) for k, v in decision.numbers.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def write_report(path: str, decision: Decision, model_name: str, challenger_version: str) -> None:
    """Write the decision as Markdown (rendered in the Kubeflow UI) to ``path``."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown_report(decision, model_name, challenger_version))


def markdown_report(decision: Decision, model_name: str, challenger_version: str) -> str:
    """The decision as Markdown."""
    verdict = "**passed**: it may be rolled out" if decision.passed else "**failed**: kept back"
    lines = [
        "# fineserve gate",
        "",
        f"{model_name} v{challenger_version} {verdict}.",
        "",
        f"Reason: {decision.reason}.",
        "",
        "| number | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value} |" for name, value in decision.numbers.items()]
    return "\n".join(lines) + "\n"


@component
def gate(
    dataset: Input[Dataset],
    results: Input[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
    model_name: str,
    challenger_version: str,
    tracking_uri: str = "",
    inference_service: str = "fineserve",
    namespace: str = "",
    kube_context: str = "",
    min_macro_f1: float = 0.0,
    macro_f1_tolerance: float = 0.01,
    n_bootstrap: int = 1000,
    seed: int = 42,
) -> NamedTuple("GateOutputs", [("passed", bool), ("reason", str)]):
    """Decide whether the registered challenger may replace the champion.

    Args:
        dataset: Input DatasetDict from the download step (its test split is scored).
        results: Input evaluation results with the challenger's test predictions.
        model_name: Registered model name in the MLflow Model Registry.
        challenger_version: The version the register step made (alias `challenger`).
        tracking_uri: MLflow tracking URI; empty for MLFLOW_TRACKING_URI, else a local SQLite
            store.
        inference_service: InferenceService whose served version is the champion when there
            is a cluster (MLflow's `champion` alias is moved to match); else the alias counts.
        namespace: Its namespace; empty for the pod's own (in a cluster) or the kube context's.
        kube_context: Kubeconfig context to read it with; empty inside a cluster. A local run
            with none compares against the `champion` alias.
        min_macro_f1: The challenger's test macro-F1 must be at least this.
        macro_f1_tolerance: How much worse than the champion the challenger may be: the lower
            bound of the 95% paired-bootstrap interval of their macro-F1 difference must be
            above minus this.
        n_bootstrap: Bootstrap resamples for the confidence intervals.
        seed: Seed for the paired bootstrap.

    Returns:
        metrics: Output the scores and the interval the decision was made on.
        report: Output Markdown report of the decision (rendered in the Kubeflow UI).
        passed: Whether the challenger may be rolled out.
        reason: Why, in a sentence.
    """
    from collections import namedtuple

    from fineserve.components import gate as step
    from fineserve.core import artifacts, registry

    evaluation = artifacts.read_evaluation_results(results.path)
    client = registry.mlflow_client(tracking_uri)
    champion_version, note = step.current_champion(
        client,
        model_name,
        inference_service=inference_service,
        namespace=namespace,
        kube_context=kube_context,
    )
    if note:
        step.log.warning("gate: %s", note)
    champion = step.compare_with_champion(
        client,
        model_name,
        champion_version,
        dataset.path,
        evaluation["predictions"],
        n_resamples=n_bootstrap,
        seed=seed,
    )
    decision = step.decide(
        evaluation["model"]["macro_f1"],
        champion,
        min_macro_f1=min_macro_f1,
        macro_f1_tolerance=macro_f1_tolerance,
    )
    if note:
        decision.numbers["champion_source"] = note
    step.log.info("gate %s: %s", "passed" if decision.passed else "failed", decision.reason)
    step.tag_version(client, model_name, challenger_version, decision)
    for name, value in decision.numbers.items():
        if isinstance(value, float):
            metrics.log_metric(name, round(value, 5))
    metrics.log_metric("passed", float(decision.passed))
    step.write_report(report.path, decision, model_name, challenger_version)
    outputs = namedtuple("GateOutputs", ["passed", "reason"])
    return outputs(decision.passed, decision.reason)
