"""`fineserve run --local` end to end: the real DAG, a tiny BERT, a real MLflow store."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from fineserve.core.artifacts import read_probe_texts

pytestmark = pytest.mark.slow


def _fineserve(*args: str, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # the local default store: MLFLOW_TRACKING_URI (which mlflow.set_tracking_uri exports
    # from other tests in this process) would name another
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "fineserve", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_local_run_registers_a_version_with_alias_and_metrics(
    small_corpus_csv, tiny_base_model, tmp_path
):
    # a path with "python3" in it, as every venv's site-packages has (kfp.local used to mangle it)
    data = tmp_path / "lib" / "python3.11" / "corpus.csv"
    data.parent.mkdir(parents=True)
    data.write_bytes(small_corpus_csv.read_bytes())
    (tmp_path / "params.yaml").write_text(
        f"dataset: {data}\nbase_model: {tiny_base_model}\nmax_length: 32\n"
    )
    run = _fineserve(
        "run", "--local", "--params", "params.yaml",
        "-p", "epochs=1", "-p", "learning_rate=0.001", "-p", "n_bootstrap=100",
        "-p", "model_name=e2e",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    lines = out.splitlines()
    # a person reads a line per step, the training progress and the summary...
    assert len(lines) < 40, out
    for task in ("download", "tokenize", "train", "evaluate", "register", "gate"):
        assert re.search(rf"^{task} +SUCCESS in \d+\.\d s$", out, re.MULTILINE), out
    assert re.search(r"^train +epoch 1: validation macro-F1 0\.\d{4}, accuracy", out, re.M), out
    assert "macro-F1" in out and "TF-IDF + logistic regression baseline" in out
    assert re.search(r"served in reduced precision .*int8 macro-F1 0\.\d{4}, [\d.]+% same", out)
    # ...and the executors' full output is in the log the first line names
    log_path = tmp_path / lines[0].split(": ", 1)[1].split(" (")[0]
    log = log_path.read_text()
    assert "Task \x1b[96m'register'\x1b[0m finished with status \x1b[92mSUCCESS" in log
    assert "Got executor_input" in log and "executor_input" not in out
    assert "model version e2e v1 (alias @challenger)" in out
    assert "gate: passed: no champion yet: the absolute threshold decides" in out
    assert "deploy: skipped: no cluster named (-p kube_context=NAME" in out

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("e2e", "challenger")
    run_data = client.get_run(version.run_id).data
    assert {"accuracy", "macro_f1", "baseline_macro_f1", "train_samples_per_second"} <= set(
        run_data.metrics
    )
    assert "int8_agreement" in run_data.metrics  # what int8 serving would cost
    # the registered directory carries its probe texts: what the predictor checks at load
    stored = Path(version.tags["fineserve.storage_uri"].removeprefix("file://"))
    assert read_probe_texts(tmp_path / stored)  # (relative: to where the run ran)
    assert run_data.params["rows_train"] == "240"
    assert version.tags["fineserve.dataset_fingerprint"] == run_data.params["dataset_fingerprint"]
    assert version.tags["fineserve.gate.passed"] == "true"
    assert (tmp_path / "local_outputs").is_dir() and (tmp_path / "mlartifacts").is_dir()


def test_local_run_with_a_kube_context_deploys_the_gated_version(
    small_corpus_csv, tiny_base_model, s3, fake_kube, kserve_controller, tmp_path
):
    # a cluster named: the gate passes (no champion), deploy rolls the version out from S3
    kubeconfig = fake_kube.kubeconfig(tmp_path / "kubeconfig")
    run = _fineserve(
        "run", "--local",
        "-p", f"dataset={small_corpus_csv}", "-p", f"base_model={tiny_base_model}",
        "-p", "max_length=32", "-p", "epochs=1", "-p", "learning_rate=0.001",
        "-p", "n_bootstrap=100", "-p", "model_name=e2e-deploy",
        "-p", "artifact_location=s3://fineserve/local-run",
        "-p", "kube_context=fake", "-p", "namespace=fineserve",
        "-p", "ready_timeout=30",
        cwd=tmp_path,
        env={**s3, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"^deploy +SUCCESS in \d+\.\d s$", out, re.MULTILINE), out
    assert "deploy: InferenceService fineserve: created: v1 serves all traffic." in out, out

    isvc = fake_kube.get(
        "serving.kserve.io", "v1beta1", "inferenceservices", "fineserve", "fineserve"
    )
    predictor = isvc["spec"]["predictor"]
    assert predictor["labels"]["fineserve.io/model-version"] == "1"
    (container,) = predictor["containers"]
    (storage_uri,) = [e["value"] for e in container["env"] if e["name"] == "STORAGE_URI"]
    assert storage_uri.startswith("s3://fineserve/local-run/"), storage_uri
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert str(client.get_model_version_by_alias("e2e-deploy", "champion").version) == "1"


def test_bad_parameters_are_refused_before_anything_runs(tmp_path):
    run = _fineserve("run", "--local", "-p", "epochs=many", cwd=tmp_path)
    assert run.returncode == 2
    assert "parameter 'epochs' expects a number, got 'many'" in run.stderr
    assert not (tmp_path / "local_outputs").exists()


def test_a_failing_step_fails_the_run_with_its_message(small_corpus_csv, tmp_path):
    run = _fineserve(
        "run", "--local", "-p", f"dataset={small_corpus_csv}", "-p", "text_column=body",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1
    output = run.stdout + run.stderr
    assert (
        "text column 'body' is missing from split 'train'; columns present: ['text', 'label']"
        in (output)
    )
    assert "Inner task failed" in output and "download" in output
    assert re.search(r"^download +FAILURE in", run.stdout, re.MULTILINE), run.stdout
    # the step's own message, without the traceback around it
    assert "download   error: text column 'body' is missing from split 'train'" in run.stdout
    assert "Traceback" not in run.stdout
    assert "the full output of every step is in" in run.stdout
    assert len(run.stdout.splitlines()) < 40


def test_a_dataset_with_rare_classes_runs_through_and_the_summary_names_them(
    tiny_base_model, tmp_path
):
    rows = [
        {"text": f"{label} question number {i}", "label": label}
        for label, count in {"HUM:ind": 40, "LOC:city": 40, "NUM:date": 40, "ABBR:abb": 3}.items()
        for i in range(count)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "trec.csv", index=False)
    run = _fineserve(
        "run", "--local",
        "-p", f"dataset={tmp_path / 'trec.csv'}", "-p", f"base_model={tiny_base_model}",
        "-p", "max_length=16", "-p", "epochs=1", "-p", "n_bootstrap=50",
        "-p", "serving_precisions=none", "-p", "model_name=rare",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert (
        "WARNING: 1 of 4 classes are not in the test split, so no score covers them: "
        "'ABBR:abb' (3 train rows); rare classes, kept in train only (rare_classes=keep)" in out
    ), out
    assert "ABBR:abb -, HUM:ind " in out  # no per-class score for it
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("rare", "challenger")
    report = client.download_artifacts(version.run_id, "evaluation/report.md", str(tmp_path))
    assert "| ABBR:abb | not in the test split |" in Path(report).read_text()
