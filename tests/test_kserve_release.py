"""One supported KServe, named once (fineserve.core.defaults) and the same everywhere.

The cluster's KServe (controller, webhooks, CRDs) is the line `SUPPORTED_KSERVE`, tested at
`KSERVE_RELEASE`: the control plane the tests build, the cluster workflow, the storage-initializer
code the tests run and the docs must all say so. The Python `kserve` package is the predictor's
model-server library and the typed API models: its own pin, but never older than the API the
cluster serves.
"""

from __future__ import annotations

import re
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fineserve.core.defaults import KSERVE_RELEASE, SUPPORTED_KSERVE

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINE = SpecifierSet(SUPPORTED_KSERVE)
#: Where a person reads which KServe to run.
DOCS = ["README.md", "docs/cluster-ci.md", "docs/control-plane.md", "manifests/README.md"]
#: "KServe 0.20", "KServe v0.20.0", and open ranges ("KServe ≥ 0.20", "KServe (>= 0.20").
MENTION = re.compile(r"\bKServe[ (]+(≥|>=)?\s*v?(\d+\.\d+(?:\.\d+)?)")


def pins() -> dict[str, str]:
    """constraints.txt as name → version."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, pinned = line.split("#")[0].strip().partition("==")
        if sep:
            found[name.strip().lower()] = pinned.strip()
    return found


def test_the_tested_release_is_of_the_supported_line():
    assert Version(KSERVE_RELEASE) in LINE, f"{KSERVE_RELEASE} is not in {SUPPORTED_KSERVE}"


def test_the_control_plane_builds_the_supported_release():
    go_mod = (ROOT / "controlplane" / "go.mod").read_text()
    required = re.findall(r"^\s*github\.com/kserve/kserve (v\S+)", go_mod, re.MULTILINE)
    assert required == [f"v{KSERVE_RELEASE}"], f"controlplane/go.mod requires KServe {required}"


def test_the_cluster_workflow_installs_the_supported_release():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "cluster.yml").read_text())
    job = workflow["jobs"]["kind-kserve"]
    assert job["env"]["KSERVE_VERSION"] == f"v{KSERVE_RELEASE}"
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "kserve/kserve/releases/download/${KSERVE_VERSION}/" in commands
    other = re.findall(r"kserve/kserve/releases/download/(v[\d.]+)", commands)
    assert not other, f"the workflow installs KServe {other} besides ${{KSERVE_VERSION}}"


def test_the_tests_run_the_storage_initializer_of_the_supported_release():
    """kserve-storage is the code of KServe's storage-initializer image of a release."""
    assert pins()["kserve-storage"] == KSERVE_RELEASE
    assert installed_version("kserve-storage") == KSERVE_RELEASE, (
        "the installed kserve-storage is not constraints.txt's: run scripts/setup.sh"
    )


def test_the_python_sdk_models_at_least_the_supported_api():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    (sdk,) = [r for r in requirements if r.name == "kserve"]
    pinned = pins()["kserve"]
    assert Version(pinned) in sdk.specifier, f"constraints.txt pins kserve {pinned}: {sdk}"
    oldest = min(Version(s.version) for s in LINE if s.operator == ">=")
    below = Version(f"{oldest.major}.{oldest.minor - 1}.99")
    assert below not in sdk.specifier, (
        f"pyproject.toml allows kserve {below}, whose models lack the API of KServe {oldest}"
    )


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_name_the_supported_line_and_no_other(doc):
    mentions = MENTION.findall((ROOT / doc).read_text())
    assert mentions, f"{doc} does not say which KServe to run"
    for operator, named in mentions:
        assert not operator, f"{doc}: 'KServe {operator} {named}' is open-ended; say {LINE}"
        assert Version(named) in LINE, f"{doc} names KServe {named}, outside {LINE}"
