"""The artifact contract: what each step leaves in its artifacts, and fineserve's MLflow names.

| artifact (step)          | what is inside                                                    |
| ------------------------ | ----------------------------------------------------------------- |
| Dataset (download)       | DatasetDict (`text`, `label` ClassLabel) + `metadata.json`        |
| Dataset (tokenize)       | DatasetDict (`input_ids`, `attention_mask`, `label`, `length`)    |
|                          | + `tokenizer/` + `token_stats.json`                               |
| Model (train)            | HF directory (safetensors, config with id2label, tokenizer)       |
|                          | + `fineserve.json` (how it was trained)                           |
| Artifact (evaluate)      | evaluation results as JSON                                        |
| MLflow version (register)| pyfunc model whose artifact `hf_model` is the HF directory;       |
|                          | `fineserve.*` tags; aliases `challenger`, `champion`, `previous`  |

Steps read their predecessors' artifacts only through this module, never through each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from fineserve.core.errors import DataError

# --- Dataset artifacts -----------------------------------------------------------------------
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
#: Token count of each row, written by tokenize (length-bucketed batches use it).
LENGTH_COLUMN = "length"
SPLITS = ("train", "validation", "test")
DATASET_METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_STATS_FILE = "token_stats.json"

# --- Model artifact --------------------------------------------------------------------------
MODEL_INFO_FILE = "fineserve.json"

# --- MLflow ----------------------------------------------------------------------------------
#: The pyfunc artifact of a registered version that holds the HF directory (a KServe storageUri).
HF_MODEL_ARTIFACT = "hf_model"
#: In a registered model directory: texts of its own test split, the serving precision probe.
PROBE_FILE = "fineserve-probe.json"
TAG_PIPELINE_RUN_ID = "fineserve.pipeline_run_id"
TAG_MLFLOW_RUN_ID = "fineserve.mlflow_run_id"
TAG_DATASET_FINGERPRINT = "fineserve.dataset_fingerprint"
TAG_BASE_MODEL = "fineserve.base_model"
TAG_IMAGE = "fineserve.image"
TAG_STORAGE_URI = "fineserve.storage_uri"
#: The gate's decision on a version: "true" or "false", why, and its numbers under the prefix.
TAG_GATE_PREFIX = "fineserve.gate."
TAG_GATE_PASSED = TAG_GATE_PREFIX + "passed"
TAG_GATE_REASON = TAG_GATE_PREFIX + "reason"
#: The version a run just registered; the gate compares it with the champion.
CHALLENGER = "challenger"
#: The version serving all traffic.
CHAMPION = "champion"
#: The champion before the last promotion: what a rollback returns to.
PREVIOUS = "previous"
ALIASES = (CHALLENGER, CHAMPION, PREVIOUS)


class RareClasses(TypedDict):
    """The download step's rare classes and what it did with them (keep, drop or fail).

    `classes`: each class with fewer than `min_class_rows` train rows → its train rows.
    """

    policy: str
    min_class_rows: int
    classes: dict[str, int]


class DatasetMetadata(TypedDict):
    """`metadata.json` of the download step's Dataset (`rare_classes`: absent in older ones)."""

    source: str
    label_names: list[str]
    rows: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    created_splits: list[str]
    dropped_rows: dict[str, dict[str, int]]
    rare_classes: RareClasses
    fingerprint: str


class TokenStats(TypedDict):
    """`token_stats.json` of the tokenize step's Dataset."""

    base_model: str
    max_length: int
    token_lengths: dict[str, dict[str, float]]
    dataset: dict[str, Any]


class ModelInfo(TypedDict, total=False):
    """`fineserve.json` of the train step's Model: how it was trained (all keys optional)."""

    base_model: str
    base_model_revision: str
    dataset: dict[str, Any]
    max_length: int
    labels: list[str]
    device: str
    precision: str
    resumed_from: str | None
    best_checkpoint: str | None
    hyperparameters: dict[str, Any]
    recipe: dict[str, Any]  # what the recipe chose: epochs (and why), learning rate, weighting
    train_metrics: dict[str, Any]
    model_version: str


class _EvaluationNumbers(TypedDict):
    label_names: list[str]
    test_rows: int
    n_bootstrap: int
    model: dict[str, Any]
    confidence_intervals: dict[str, tuple[float, float]]
    baseline: dict[str, Any] | None


class EvaluationResults(_EvaluationNumbers, total=False):
    """The evaluate step's `results` JSON: every number of the evaluation.

    `warnings` (absent in older results) says why the scores may mean little; `predictions`
    holds the predicted class id of each test row, in order (the gate's paired comparison).
    """

    warnings: list[str]
    predictions: list[int]
    recipe: dict[str, Any]  # what the train step's recipe chose (its fineserve.json)
    precisions: dict[str, dict[str, float]]  # reduced precisions scored against float32
    probe_texts: list[str]  # test texts stored with the registered model (`PROBE_FILE`)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _read_json(path: Path, what: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{path.parent} is not {what}: it has no {path.name}") from err
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def write_dataset_metadata(dataset_dir: str | Path, metadata: DatasetMetadata) -> None:
    """Write the download step's `metadata.json` next to its data."""
    _write_json(Path(dataset_dir, DATASET_METADATA_FILE), metadata)


def read_dataset_metadata(dataset_dir: str | Path) -> DatasetMetadata:
    """The download step's `metadata.json`."""
    return _read_json(Path(dataset_dir, DATASET_METADATA_FILE), "a download step's Dataset")


def write_token_stats(tokenized_dir: str | Path, stats: TokenStats) -> None:
    """Write the tokenize step's `token_stats.json` next to its data."""
    _write_json(Path(tokenized_dir, TOKEN_STATS_FILE), stats)


def read_token_stats(tokenized_dir: str | Path) -> TokenStats:
    """The tokenize step's `token_stats.json`."""
    return _read_json(Path(tokenized_dir, TOKEN_STATS_FILE), "a tokenize step's Dataset")


def tokenizer_dir(tokenized_dir: str | Path) -> Path:
    """Where the tokenize step saved the tokenizer the data was made with."""
    return Path(tokenized_dir, TOKENIZER_DIR)


def write_model_info(model_dir: str | Path, info: ModelInfo) -> None:
    """Write `fineserve.json` into a model directory."""
    _write_json(Path(model_dir, MODEL_INFO_FILE), info)


def read_model_info(model_dir: str | Path, *, missing_ok: bool = False) -> ModelInfo:
    """A model directory's `fineserve.json`; ``missing_ok``: {} for a model trained elsewhere."""
    path = Path(model_dir, MODEL_INFO_FILE)
    if missing_ok and not path.is_file():
        return {}
    return _read_json(path, "a fineserve model directory")


def write_probe(model_dir: str | Path, texts: list[str], source: str) -> None:
    """Store the texts a server probes reduced precisions with in a model directory."""
    _write_json(Path(model_dir, PROBE_FILE), {"source": source, "texts": texts})


def read_probe_texts(model_dir: str | Path) -> list[str] | None:
    """A model directory's probe texts; None when it has none."""
    path = Path(model_dir, PROBE_FILE)
    if not path.is_file():
        return None
    texts = _read_json(path, "a model directory").get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{path}: 'texts' must be a list of strings")
    return texts


def write_evaluation_results(path: str | Path, results: EvaluationResults) -> None:
    """Write the evaluate step's results JSON."""
    _write_json(Path(path), results)


def read_evaluation_results(path: str | Path) -> EvaluationResults:
    """The evaluate step's results JSON."""
    return _read_json(Path(path), "an evaluate step's output folder")


def summary_metrics(results: EvaluationResults) -> dict[str, float]:
    """The scalar metrics a run is judged and compared by (KFP Metrics, MLflow metrics)."""
    model, ci = results["model"], results["confidence_intervals"]
    scalars = {
        "accuracy": model["accuracy"],
        "macro_f1": model["macro_f1"],
        "accuracy_ci_low": ci["accuracy"][0],
        "accuracy_ci_high": ci["accuracy"][1],
        "macro_f1_ci_low": ci["macro_f1"][0],
        "macro_f1_ci_high": ci["macro_f1"][1],
    }
    support = model.get("support") or [1] * len(model["f1"])  # absent: not made by evaluate
    for name, f1, rows in zip(results["label_names"], model["f1"], support, strict=True):
        if rows:  # a class the test split does not hold has no score
            scalars[f"f1_{name}"] = f1
    for name, scores in results.get("precisions", {}).items():
        scalars[f"{name}_macro_f1"] = scores["macro_f1"]
        scalars[f"{name}_agreement"] = scores["agreement"]
    if results["baseline"] is not None:
        scalars["baseline_accuracy"] = results["baseline"]["accuracy"]
        scalars["baseline_macro_f1"] = results["baseline"]["macro_f1"]
    return {name: round(float(value), 5) for name, value in scalars.items()}
