"""The real control plane for tests: kube-apiserver, etcd and KServe's controller and webhooks.

`scripts/build-control-plane.sh` builds it from Go modules (cached outside the repository) and
`controlplane/` drives it; docs/control-plane.md says what is real and what is emulated. This
module starts it for a pytest session and tells the tests how to reach it.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-control-plane.sh"
#: A cold build compiles kube-apiserver and KServe: tens of minutes on two cores.
BUILD_TIMEOUT_S = 3600
START_TIMEOUT_S = 300
#: The ConfigMap in a namespace that says how the pods of each Deployment behave
#: (controlplane/kubelet.go): key the Deployment's name, value `ready`, `not-ready` or
#: `crash[: message]`.
KUBELET_CONFIGMAP = "fake-kubelet"


def go_missing_reason() -> str | None:
    """Why the control plane cannot be built here, or None when it can."""
    if shutil.which("go") is None:
        return "no Go toolchain: the real control plane is built from Go modules (install Go)"
    if shutil.which("bash") is None:
        return "no bash to run scripts/build-control-plane.sh"
    return None


def build() -> Path:
    """Build the control plane if its cache entry is missing; the folder that holds it."""
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{BUILD_SCRIPT.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    """A running control plane: its kubeconfig, its logs, and helpers for tests."""

    kubeconfig: Path
    run_dir: Path
    process: subprocess.Popen
    _names: itertools.count = field(default_factory=itertools.count)

    def api_client(self):
        """A kubernetes ApiClient authenticated as the cluster's admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def namespace(self, prefix: str = "test") -> str:
        """Create a namespace of a new name and return the name."""
        from kubernetes import client

        name = f"{prefix}-{next(self._names)}-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(self.api_client()).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )
        return name

    def set_pod_behaviour(self, namespace: str, deployment: str, behaviour: str) -> None:
        """Make the pods of ``deployment`` behave so: ``ready``, ``not-ready``, ``crash[: msg]``."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client())
        patch = {"data": {deployment: behaviour}}
        try:
            core.patch_namespaced_config_map(KUBELET_CONFIGMAP, namespace, patch)
        except ApiException as err:
            if err.status != 404:
                raise
            core.create_namespaced_config_map(
                namespace,
                client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=KUBELET_CONFIGMAP), data=patch["data"]
                ),
            )

    def logs(self) -> str:
        """The tail of each log of the run, for a failure message."""
        parts = []
        for path in sorted(self.run_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def start(run_dir: Path, assets: Path | None = None) -> ControlPlane:
    """Build if needed and start the control plane; returns once KServe's webhooks serve.

    The control plane stops when `stop` closes its stdin, or when this process dies.
    """
    assets = assets or build()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "controlplane.log").open("w")
    process = subprocess.Popen(
        [
            str(assets / "bin" / "controlplane"),
            f"-assets={assets}",
            f"-run-dir={run_dir}",
            "-exit-on-stdin-eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
    )
    log.close()
    lines: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    plane = ControlPlane(kubeconfig=Path(), run_dir=run_dir, process=process)
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            stop(plane)
            raise RuntimeError(
                f"the control plane did not start within {START_TIMEOUT_S} s "
                f"(exit {process.returncode}); logs in {run_dir}:\n{plane.logs()}"
            )
        if line.startswith("export KUBECONFIG="):
            plane.kubeconfig = Path(line.strip().split("=", 1)[1])
            return plane


def stop(plane: ControlPlane) -> None:
    """Stop the control plane and every process it started."""
    if plane.process.stdin and not plane.process.stdin.closed:
        plane.process.stdin.close()
    try:
        plane.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        plane.process.terminate()
        plane.process.wait(timeout=30)
