"""Resolve a model URI (local dir, models:/, runs:/, any MLflow artifact URI) to a HF directory."""

from __future__ import annotations

from pathlib import Path

import yaml

from fineserve.core.artifacts import HF_MODEL_ARTIFACT as HF_ARTIFACT


def _pyfunc_artifact_dir(root: Path) -> Path | None:
    """The `hf_model` artifact directory an MLflow pyfunc model's MLmodel file points to.

    MLflow copies an artifact to ``artifacts/<source dir name>``, so the MLmodel file, not a
    fixed path, says where it is.
    """
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return None
    spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    path = (artifacts.get(HF_ARTIFACT) or {}).get("path")
    return root / path if path else None


def find_hf_dir(root: str | Path) -> Path:
    """The directory holding config.json: ``root``, or the `hf_model` artifact of a pyfunc model."""
    root = Path(root)
    candidates = [root, _pyfunc_artifact_dir(root), root / "artifacts" / HF_ARTIFACT]
    for candidate in candidates:
        if candidate is not None and (candidate / "config.json").is_file():
            return candidate
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise FileNotFoundError(
        f"no HF model in {root}: expected config.json there or in the '{HF_ARTIFACT}' artifact "
        f"of an MLflow pyfunc model (found: {', '.join(found) or 'nothing'})"
    )


def resolve_model_dir(uri: str, dst: str | None = None) -> Path:
    """Download ``uri`` with MLflow (unless it is a local directory) and return the HF dir in it.

    Accepts a local directory, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``
    or any URI `mlflow.artifacts.download_artifacts` accepts. The tracking server is taken from
    MLFLOW_TRACKING_URI (or `mlflow.set_tracking_uri`). ``dst`` is where to download to
    (default: a fresh temporary directory).
    """
    local = Path(uri).expanduser()
    if ":/" not in uri and local.is_dir():
        return find_hf_dir(local)
    import mlflow.artifacts  # heavy import; only when something has to be downloaded

    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    return find_hf_dir(downloaded)
