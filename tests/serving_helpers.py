"""Start a real predictor process on free local ports for the serving tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def server_env() -> dict[str, str]:
    """The environment a predictor subprocess runs in: offline, importing this checkout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A predictor subprocess, started by ``argv`` (its ports appended), ready once entered."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, startup_timeout: float = 90.0):
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.argv = list(argv)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.argv, *self.port_args()],
                cwd=REPO,
                env=server_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def port_args(self) -> list[str]:
        """Underscore-style KServe options; `fineserve serve` callers override this."""
        return ["--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {self.startup_timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def serve_module_argv(model_dir: Path, model_name: str, *extra: str) -> list[str]:
    """``python -m fineserve.serving`` as KServe runs a custom predictor."""
    return [
        sys.executable,
        "-m",
        "fineserve.serving",
        "--model_name",
        model_name,
        "--model_dir",
        str(model_dir),
        *extra,
    ]


def v2_body(texts: list, *, request_id: str | None = None, **tensor: object) -> dict:
    """A v2 inference request body with one BYTES tensor (fields overridable for bad input)."""
    spec = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}
    spec.update(tensor)
    body: dict = {"inputs": [spec]}
    if request_id is not None:
        body["id"] = request_id
    return body


class BackgroundServer:
    """A server process (MLflow, moto, Prometheus) started for the tests, up once entered.

    It is up when ``health_url`` answers ``healthy_codes``; its output goes to ``log_path``,
    whose tail a failed start reports.
    """

    def __init__(
        self,
        argv: Sequence[str],
        health_url: str,
        *,
        log_path: Path,
        what: str,
        timeout: float = 120.0,
        healthy_codes: tuple[int, ...] = (200,),
    ) -> None:
        self.argv, self.health_url, self.log_path = list(argv), health_url, log_path
        self.what, self.timeout, self.healthy_codes = what, timeout, healthy_codes
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BackgroundServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.what} exited with {self.proc.returncode}:\n"
                        + self.log_path.read_text(errors="replace")[-3000:]
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.what} did not start in {self.timeout:g} s")
                try:
                    if httpx.get(self.health_url, timeout=1).status_code in self.healthy_codes:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
