"""register: one MLflow run per pipeline run, and a model version aliased `challenger`.

The run holds the parameters, metrics, Markdown report and a confusion-matrix PNG. The version
is a pyfunc model (`fineserve.components.mlflow_pyfunc`) whose `artifacts/hf_model/` folder is
the HF directory itself, so a KServe `storageUri` pointing there serves it as it is.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model

from fineserve.components.decorator import component
from fineserve.core.artifacts import (
    HF_MODEL_ARTIFACT,
    PROBE_FILE,
    TAG_PIPELINE_RUN_ID,
    ModelInfo,
    write_probe,
)
from fineserve.core.errors import DataError

log = logging.getLogger(__name__)

#: The pyfunc "model from code" logged with every version.
PYFUNC_CODE = str(Path(__file__).with_name("mlflow_pyfunc.py"))


def _confusion_figure(matrix: list[list[int]], names: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=names)
    display.plot(cmap="Blues", colorbar=False, values_format="d")
    display.ax_.set_title("Test split confusion matrix")
    display.figure_.tight_layout()
    return display.figure_


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (no bytes copied) where the filesystem allows, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def flat_params(info: ModelInfo) -> dict[str, Any]:
    """The training settings of ``info`` as flat MLflow run parameters."""
    data = info["dataset"]
    return {
        "base_model": info["base_model"],
        "base_model_revision": info.get("base_model_revision", ""),
        "max_length": info["max_length"],
        "dataset": data["source"],
        "dataset_fingerprint": data["fingerprint"],
        **{f"rows_{split}": n for split, n in data["rows"].items()},
        "labels": ",".join(info["labels"]),
        "precision": info["precision"],
        "device": info["device"],
        **info["hyperparameters"],
        # what the recipe chose (epochs and learning rate 0 in the hyperparameters mean "its")
        **{f"recipe_{k}": v for k, v in (info.get("recipe") or {}).items()},
    }


def check_model_name(model_name: str) -> None:
    """A registered model name is plain: no `/` or `:` (those would make a models:/ URI)."""
    if not model_name or "/" in model_name or ":" in model_name:
        raise DataError(f"model_name must be a plain registry name, got {model_name!r}")


def experiment_id(
    client, experiment_name: str, artifact_location: str, tracking_uri: str = ""
) -> str:
    """The id of ``experiment_name``, created (with ``artifact_location``) when missing.

    This is the step's first call to MLflow: a tracking URI it cannot use fails here, named.
    """
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment:
            return experiment.experiment_id
        return client.create_experiment(experiment_name, artifact_location or None)
    except MlflowException as err:
        raise DataError(
            f"MLflow at tracking_uri {tracking_uri!r} refused experiment {experiment_name!r}: "
            f"{err.message}; check tracking_uri (and artifact_location)"
        ) from err


def existing_run(client, experiment: str, pipeline_run_id: str) -> str | None:
    """The MLflow run an earlier try of this pipeline run made, if any (a retried step)."""
    runs = client.search_runs(
        [experiment], filter_string=f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'"
    )
    return runs[0].info.run_id if runs else None


def log_evaluation(results: dict[str, Any], report_path: str, train_metrics: dict) -> None:
    """Log metrics, the Markdown report, the results and a confusion-matrix PNG to the run."""
    import mlflow

    from fineserve.core.artifacts import summary_metrics

    train_scalars = {
        f"train_{k}".replace("train_train_", "train_"): v
        for k, v in train_metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    mlflow.log_metrics({**summary_metrics(results), **train_scalars})
    mlflow.log_text(Path(report_path).read_text(), "evaluation/report.md")
    mlflow.log_dict(results, "evaluation/results.json")
    figure = _confusion_figure(results["model"]["confusion_matrix"], results["label_names"])
    mlflow.log_figure(figure, "evaluation/confusion_matrix.png")


def log_model_version(model_dir: str, model_name: str, probe_texts: list[str]) -> str:
    """Log ``model_dir`` as a pyfunc model in the active run, registered; return the version.

    ``probe_texts`` (test texts) go into the registered HF directory: the predictor checks a
    reduced precision against float32 on them at load.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )
    with tempfile.TemporaryDirectory() as staging:
        # MLflow stores an artifact folder under its own name: stage it as `hf_model`
        hf_model = Path(staging, HF_MODEL_ARTIFACT)
        shutil.copytree(model_dir, hf_model, copy_function=_link_or_copy)
        if probe_texts:  # a new file: a hard-linked one from model_dir must not change
            (hf_model / PROBE_FILE).unlink(missing_ok=True)
            write_probe(hf_model, probe_texts, "test split of the evaluate step")
        model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PYFUNC_CODE,
            artifacts={HF_MODEL_ARTIFACT: str(hf_model)},
            signature=signature,
            pip_requirements=[f"mlflow=={mlflow.__version__}", "transformers", "torch"],
            registered_model_name=model_name,
        )
    return str(model_info.registered_model_version)


@component
def register(
    model: Input[Model],
    results: Input[Artifact],
    report: Input[Markdown],
    model_name: str,
    tracking_uri: str = "",
    experiment_name: str = "fineserve",
    artifact_location: str = "",
    alias: str = "challenger",
    image: str = "",
    pipeline_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
) -> NamedTuple("RegisterOutputs", [("run_id", str), ("model_version", str), ("storage_uri", str)]):
    """Log the pipeline run to MLflow and register the model version with an alias.

    Args:
        model: Input HF directory from the train step.
        results: Input evaluation results (JSON) from the evaluate step.
        report: Input Markdown report from the evaluate step.
        model_name: Registered model name in the MLflow Model Registry.
        tracking_uri: MLflow tracking URI; empty for MLFLOW_TRACKING_URI, else a local SQLite
            store.
        experiment_name: MLflow experiment the run is logged in (created when missing).
        artifact_location: Artifact root for a newly created experiment; empty for the server's.
        alias: Alias set on the new version (the deploy step serves `challenger`).
        image: The image the pipeline's steps run in, tagged on the version.
        pipeline_run_id: KFP run id (filled in by KFP), tagged on the run and the version.

    Returns:
        run_id: The MLflow run id.
        model_version: The registered model version.
        storage_uri: Where the version's HF directory is stored (a KServe `storageUri`).
    """
    from collections import namedtuple

    import mlflow

    from fineserve.components import registration as step
    from fineserve.core import artifacts, registry

    step.check_model_name(model_name)
    tracking_uri = registry.resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = registry.mlflow_client(tracking_uri)
    experiment = step.experiment_id(client, experiment_name, artifact_location, tracking_uri)
    info = artifacts.read_model_info(model.path)
    evaluation = artifacts.read_evaluation_results(results.path)
    tags = {
        artifacts.TAG_PIPELINE_RUN_ID: pipeline_run_id,
        artifacts.TAG_DATASET_FINGERPRINT: info["dataset"]["fingerprint"],
        artifacts.TAG_BASE_MODEL: info["base_model"],
        artifacts.TAG_IMAGE: image,
    }
    run_id = step.existing_run(client, experiment, pipeline_run_id)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment,
        run_name=None if run_id else f"fineserve-{pipeline_run_id}"[:250],
        tags=tags,
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(step.flat_params(info))
        step.log_evaluation(evaluation, report.path, info["train_metrics"])
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        if versions:
            version = str(versions[0].version)
            step.log.info("run %s already registered %s version %s", run_id, model_name, version)
        else:
            probe = evaluation.get("probe_texts", [])
            version = step.log_model_version(model.path, model_name, probe)
    for key, value in {**tags, artifacts.TAG_MLFLOW_RUN_ID: run_id}.items():
        client.set_model_version_tag(model_name, version, key, value)
    storage_uri = registry.model_dir_uri(client, model_name, version)
    client.set_model_version_tag(model_name, version, artifacts.TAG_STORAGE_URI, storage_uri)
    registry.set_alias(client, model_name, alias, version)
    step.log.info("registered %s version %s as @%s: %s", model_name, version, alias, storage_uri)
    outputs = namedtuple("RegisterOutputs", ["run_id", "model_version", "storage_uri"])
    return outputs(run_id, version, storage_uri)
