"""manifests/ as a user applies it: built with `kubectl kustomize`, applied with `kubectl`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"


def kubectl_path() -> str:
    """The kubectl command; skips the test without one."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; it builds the kustomizations (kubectl kustomize)")
    return kubectl


def kustomize(path: Path) -> list[dict]:
    """The objects ``path`` builds to (`kubectl kustomize`)."""
    result = subprocess.run(
        [kubectl_path(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (and ``name``) among ``objects``."""
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def in_namespace(objects: list[dict], namespace: str) -> list[dict]:
    """Copies of ``objects`` moved to ``namespace`` (as `namespace:` in an overlay would)."""
    moved = json.loads(json.dumps(objects))
    for obj in moved:
        obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
    return moved


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    """Run kubectl against ``kubeconfig``; its output (a failure fails the test with stderr)."""
    done = subprocess.run(
        [kubectl_path(), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def apply(kubeconfig: Path, objects: list[dict]) -> str:
    """`kubectl apply -f -` of ``objects`` (client-side apply, as `kubectl apply -k` does)."""
    return kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))


def user_overlay(
    folder: Path, namespace: str, resource: Path, patches: list[dict] | None = None
) -> list[dict]:
    """``resource`` (a kustomization of manifests/) as a user's own overlay builds it.

    The overlay sets ``namespace`` and applies ``patches`` (kustomize's `patches` entries).
    """
    folder.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [os.path.relpath(resource, folder)],  # kustomize takes no absolute path
        "patches": patches or [],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(folder)
