"""The training DAG: download → tokenize → train → evaluate → register.

Every knob is a pipeline parameter; the defaults are the cluster defaults (a Hub checkpoint and
a Hub dataset). `pipelines.params.LOCAL_DEFAULTS` swaps in the offline ones for local runs.
"""

from typing import NamedTuple

from kfp import dsl

from components.download import download
from components.evaluation import evaluate
from components.registration import register
from components.tokenization import tokenize
from components.training import train
from fineserve.defaults import (
    CLUSTER_BASE_MODEL,
    CLUSTER_DATASET,
    CLUSTER_DATASET_CONFIG,
    CLUSTER_TRACKING_URI,
    component_image,
)

PIPELINE_NAME = "fineserve-training"
DOWNLOAD_RETRIES = 3


class TrainingOutputs(NamedTuple):
    """What a run yields: test scores and the registered version with its storage URI."""

    accuracy: float
    macro_f1: float
    model_version: str
    storage_uri: str
    mlflow_run_id: str


def build_training_pipeline(download_retries: int = DOWNLOAD_RETRIES):
    """The DAG, with ``download_retries`` retries (backoff 30 s, doubling) on the download step.

    Local runs use 0: there a failed download is nearly always bad input, reported at once.
    """
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="Fine-tune a Hugging Face text classifier, evaluate it against a TF-IDF "
        "baseline, and register it in MLflow with the alias `challenger`.",
    )(_training_dag(download_retries))


def _training_dag(download_retries: int):
    def training_pipeline(
        dataset: str = CLUSTER_DATASET,
        dataset_config: str = CLUSTER_DATASET_CONFIG,
        dataset_revision: str = "",
        source_type: str = "auto",
        file_format: str = "auto",
        encoding: str = "utf-8",
        text_column: str = "text",
        label_column: str = "label",
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_samples: int = 0,
        max_eval_samples: int = 0,
        drop_invalid_rows: bool = False,
        base_model: str = CLUSTER_BASE_MODEL,
        base_model_revision: str = "",
        max_length: int = 128,
        epochs: float = 3.0,
        learning_rate: float = 5e-5,
        batch_size: int = 32,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        max_grad_norm: float = 1.0,
        early_stopping_patience: int = 2,
        max_steps: int = -1,
        checkpoint_dir: str = "",
        gpu_limit: int = 1,
        n_bootstrap: int = 1000,
        model_name: str = "fineserve-classifier",
        tracking_uri: str = CLUSTER_TRACKING_URI,
        experiment_name: str = "fineserve",
        artifact_location: str = "",
        seed: int = 42,
    ) -> TrainingOutputs:
        """Fine-tune, evaluate and register a text classifier.

        Args:
            dataset: Hugging Face Hub dataset id, or a local path / URL of CSV/TSV/JSONL/Parquet
                data.
            dataset_config: Hub dataset configuration name; empty for none.
            dataset_revision: Hub dataset revision; empty for the default branch.
            source_type: `auto`, `hub` or `files` (how to read `dataset`).
            file_format: `auto` (from the extension), `csv`, `tsv`, `jsonl` or `parquet`.
            encoding: Text encoding of CSV/TSV/JSONL files.
            text_column: Column holding the text.
            label_column: Column holding the label (strings or ints).
            validation_fraction: Share of train held out as validation when that split is missing.
            test_fraction: Share of train held out as test when that split is missing.
            max_train_samples: Cap on train rows for quick runs; 0 keeps all.
            max_eval_samples: Cap on validation and test rows each; 0 keeps all.
            drop_invalid_rows: Drop (and count) rows with empty text or null label instead of
                failing.
            base_model: Hub id or local directory of the base checkpoint.
            base_model_revision: Hub revision of the base checkpoint; empty for the default branch.
            max_length: Truncation length in tokens.
            epochs: Maximum epochs (early stopping may end sooner).
            learning_rate: Peak AdamW learning rate.
            batch_size: Training batch size.
            weight_decay: AdamW weight decay.
            warmup_ratio: Share of steps for linear warm-up.
            max_grad_norm: Gradient-norm clipping before each step; 0 for none.
            early_stopping_patience: Epochs without validation macro-F1 gain before stopping; 0 off.
            max_steps: Stop after this many optimizer steps; -1 for no limit.
            checkpoint_dir: Checkpoint folder (a mounted volume lets a restarted train step resume).
            gpu_limit: GPUs requested by the train step.
            n_bootstrap: Bootstrap resamples for the confidence intervals.
            model_name: Registered model name in MLflow.
            tracking_uri: MLflow tracking URI.
            experiment_name: MLflow experiment name.
            artifact_location: Artifact root for a newly created MLflow experiment.
            seed: Seed for splitting, sampling, training and the bootstrap.

        Returns:
            accuracy: Test accuracy of the fine-tuned model.
            macro_f1: Test macro-F1 of the fine-tuned model.
            model_version: The MLflow model version registered (alias `challenger`).
            storage_uri: Where that version's HF directory is stored (a KServe `storageUri`).
            mlflow_run_id: The MLflow run holding parameters, metrics and the report.
        """
        data = download(
            source=dataset,
            config=dataset_config,
            revision=dataset_revision,
            source_type=source_type,
            file_format=file_format,
            encoding=encoding,
            text_column=text_column,
            label_column=label_column,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            drop_invalid_rows=drop_invalid_rows,
            seed=seed,
        )
        data.set_display_name("download")
        if download_retries:
            data.set_retry(num_retries=download_retries, backoff_duration="30s")

        tokens = tokenize(
            dataset=data.outputs["dataset"],
            base_model=base_model,
            base_model_revision=base_model_revision,
            max_length=max_length,
        )
        tokens.set_display_name("tokenize")

        trained = train(
            tokenized=tokens.outputs["tokenized"],
            base_model=base_model,
            base_model_revision=base_model_revision,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm,
            early_stopping_patience=early_stopping_patience,
            max_steps=max_steps,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
        )
        trained.set_display_name("train")
        trained.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpu_limit)
        trained.set_cpu_request("2").set_memory_request("8G")

        scored = evaluate(
            dataset=data.outputs["dataset"],
            model=trained.outputs["model"],
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        scored.set_display_name("evaluate")

        registered = register(
            model=trained.outputs["model"],
            results=scored.outputs["results"],
            report=scored.outputs["report"],
            model_name=model_name,
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            artifact_location=artifact_location,
            image=component_image(),
        )
        registered.set_display_name("register")

        return TrainingOutputs(
            accuracy=scored.outputs["accuracy"],
            macro_f1=scored.outputs["macro_f1"],
            model_version=registered.outputs["model_version"],
            storage_uri=registered.outputs["storage_uri"],
            mlflow_run_id=registered.outputs["run_id"],
        )

    return training_pipeline


training_pipeline = build_training_pipeline()
