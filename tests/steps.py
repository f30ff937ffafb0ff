"""The pipeline's steps called in-process, as KFP's executor calls them, on paths.

Each helper runs the real `@component` function (`call_component`) and returns what the step
reported: the Dataset's metadata, the Model's metadata, the results JSON, the register outputs.
"""

from fineserve.components.decorator import call_component
from fineserve.components.download import download
from fineserve.components.evaluation import evaluate
from fineserve.components.registration import register
from fineserve.components.tokenization import tokenize
from fineserve.components.training import train
from fineserve.core.artifacts import read_evaluation_results


def download_dataset(source, out_dir, **params) -> dict:
    """The download step into ``out_dir``; returns its Dataset's metadata."""
    call = call_component(download, dataset=out_dir, source=str(source), **params)
    return dict(call.artifacts["dataset"].metadata)


def tokenize_dataset(dataset_dir, out_dir, **params) -> dict:
    """The tokenize step; returns its token statistics."""
    call = call_component(tokenize, dataset=dataset_dir, tokenized=out_dir, **params)
    return dict(call.artifacts["tokenized"].metadata)


def train_model(tokenized_dir, out_dir, **params) -> dict:
    """The train step; returns its Model's metadata (training metrics, device, precision)."""
    call = call_component(train, tokenized=tokenized_dir, model=out_dir, **params)
    return dict(call.artifacts["model"].metadata)


def evaluate_model(dataset_dir, model_dir, *, results_path, report_path, **params) -> dict:
    """The evaluate step; returns the results it wrote."""
    call_component(
        evaluate,
        dataset=dataset_dir,
        model=model_dir,
        results=results_path,
        report=report_path,
        **params,
    )
    return dict(read_evaluation_results(results_path))


def register_model(model_dir, results_path, report_path, **params) -> dict:
    """The register step; returns its outputs (run_id, model_version, storage_uri)."""
    call = call_component(
        register, model=model_dir, results=results_path, report=report_path, **params
    )
    return dict(call.outputs._asdict())
