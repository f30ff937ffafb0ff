"""register: one MLflow run per pipeline run, and a model version aliased `challenger`.

The run holds the parameters, metrics, Markdown report and a confusion-matrix PNG. The version
is a pyfunc model (`components/pyfunc_model.py`) whose `artifacts/hf_model/` folder is the HF
directory itself, so a KServe `storageUri` pointing there serves it as it is.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model

from components.errors import DataError
from components.evaluation import summary_metrics
from components.kfp_wrapper import component
from components.training import MODEL_INFO_FILE
from fineserve.defaults import local_tracking_uri

log = logging.getLogger(__name__)

RUN_ID_TAG = "fineserve.pipeline_run_id"
HF_MODEL_ARTIFACT = "hf_model"
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))


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


def _flat_params(info: dict[str, Any]) -> dict[str, Any]:
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
    }


def _existing_run(client, experiment_id: str, pipeline_run_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{pipeline_run_id}'"
    )
    return runs[0].info.run_id if runs else None


def register_model(
    model_dir: str,
    results_path: str,
    report_path: str,
    *,
    model_name: str,
    pipeline_run_id: str,
    tracking_uri: str = "",
    experiment_name: str = "fineserve",
    artifact_location: str = "",
    image: str = "",
    alias: str = "challenger",
) -> dict[str, str]:
    """Log the run and register ``model_dir`` as a new version of ``model_name``.

    A retried step (same ``pipeline_run_id``) reuses its MLflow run and, if the version was
    already made, that version. Returns the run id, version, its `storageUri` and the tracking URI.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if not model_name or "/" in model_name or ":" in model_name:
        raise DataError(f"model_name must be a plain registry name, got {model_name!r}")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(experiment_name, artifact_location or None)
    )
    info = json.loads(Path(model_dir, MODEL_INFO_FILE).read_text())
    results = json.loads(Path(results_path).read_text())
    fingerprint = info["dataset"]["fingerprint"]
    tags = {
        RUN_ID_TAG: pipeline_run_id,
        "fineserve.dataset_fingerprint": fingerprint,
        "fineserve.base_model": info["base_model"],
        "fineserve.image": image,
    }
    run_id = _existing_run(client, experiment_id, pipeline_run_id)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=None if run_id else f"fineserve-{pipeline_run_id}"[:250],
        tags=tags,
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(_flat_params(info))
        train_metrics = {
            f"train_{k}".replace("train_train_", "train_"): v
            for k, v in info["train_metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        mlflow.log_metrics({**summary_metrics(results), **train_metrics})
        mlflow.log_text(Path(report_path).read_text(), "evaluation/report.md")
        mlflow.log_dict(results, "evaluation/results.json")
        figure = _confusion_figure(results["model"]["confusion_matrix"], results["label_names"])
        mlflow.log_figure(figure, "evaluation/confusion_matrix.png")

        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        if versions:
            version = versions[0].version
            log.info("run %s already registered %s version %s", run_id, model_name, version)
        else:
            signature = ModelSignature(
                inputs=Schema([ColSpec("string")]),
                outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
            )
            with tempfile.TemporaryDirectory() as staging:
                # MLflow stores an artifact folder under its own name: stage it as `hf_model`
                hf_model = Path(staging, HF_MODEL_ARTIFACT)
                shutil.copytree(model_dir, hf_model, copy_function=_link_or_copy)
                model_info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=PYFUNC_CODE,
                    artifacts={HF_MODEL_ARTIFACT: str(hf_model)},
                    signature=signature,
                    pip_requirements=[f"mlflow=={mlflow.__version__}", "transformers", "torch"],
                    registered_model_name=model_name,
                )
            version = str(model_info.registered_model_version)
    for key, value in {**tags, "fineserve.mlflow_run_id": run_id}.items():
        client.set_model_version_tag(model_name, version, key, value)
    storage_uri = f"{client.get_model_version_download_uri(model_name, version)}/artifacts/"
    storage_uri += HF_MODEL_ARTIFACT
    client.set_model_version_tag(model_name, version, "fineserve.storage_uri", storage_uri)
    client.set_registered_model_alias(model_name, alias, version)
    log.info("registered %s version %s as @%s: %s", model_name, version, alias, storage_uri)
    return {
        "run_id": run_id,
        "model_version": str(version),
        "storage_uri": storage_uri,
        "tracking_uri": tracking_uri,
    }


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

    from components.registration import register_model

    result = register_model(
        model.path,
        results.path,
        report.path,
        model_name=model_name,
        pipeline_run_id=pipeline_run_id,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        artifact_location=artifact_location,
        image=image,
        alias=alias,
    )
    outputs = namedtuple("RegisterOutputs", ["run_id", "model_version", "storage_uri"])
    return outputs(result["run_id"], result["model_version"], result["storage_uri"])
