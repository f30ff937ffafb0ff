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


def register_copy(model_dir, work_dir, **params) -> dict:
    """Register a copy of the HF directory ``model_dir`` as the register step does after a run.

    The copy gets the `fineserve.json` a train step writes and placeholder evaluation results
    (macro-F1 0.5); ``params`` are the register step's (model_name, tracking_uri, ...).
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import AutoConfig

    work = Path(tempfile.mkdtemp(dir=work_dir, prefix="register-"))
    copy = work / "model"
    shutil.copytree(model_dir, copy)
    id2label = AutoConfig.from_pretrained(copy).id2label
    labels = [id2label[i] for i in range(len(id2label))]
    info = {
        "base_model": "tiny",
        "max_length": 64,
        "labels": labels,
        "device": "cpu",
        "precision": "fp32",
        "dataset": {"source": "c.csv", "fingerprint": "f" * 64, "rows": {"test": 3}},
        "hyperparameters": {"seed": 0},
        "train_metrics": {},
    }
    (copy / "fineserve.json").write_text(json.dumps(info))
    results = {
        "label_names": labels,
        "test_rows": 3,
        "n_bootstrap": 10,
        "model": {
            "accuracy": 0.5,
            "macro_f1": 0.5,
            "f1": [0.5] * len(labels),
            "confusion_matrix": [[int(i == j) for j in labels] for i in labels],
        },
        "confidence_intervals": {"accuracy": [0, 1], "macro_f1": [0, 1]},
        "baseline": None,
    }
    (work / "results.json").write_text(json.dumps(results))
    (work / "report.md").write_text("# report\n")
    return {
        **register_model(str(copy), str(work / "results.json"), str(work / "report.md"), **params),
        "model_dir": copy,
    }
