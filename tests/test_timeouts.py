"""A Kubernetes API that accepts connections and never answers: rollout commands end, saying so.

(Prometheus doing the same is in test_canary_analysis.py, with the analysis' lease.)
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from silent_server import SilentServer

from fineserve.cli import build_parser, main
from fineserve.core.cluster import Cluster


def _kubeconfig(path, server: str):
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "hung", "cluster": {"server": server}}],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [
                    {
                        "name": "hung",
                        "context": {"cluster": "hung", "user": "me", "namespace": "ns"},
                    }
                ],
                "current-context": "hung",
            }
        )
    )
    return path


def _main_within(argv: list[str], limit: float) -> tuple[int | None, float]:
    """Run `fineserve ARGV` in a thread: its exit code (None: still running after ``limit``)."""
    build_parser()  # the imports the command line needs, outside the time measured
    exited: list[int] = []

    def run() -> None:
        try:
            main(argv)
        except SystemExit as stop:
            exited.append(stop.code)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return (exited[0] if exited else None), time.monotonic() - started


@pytest.mark.parametrize(
    "command",
    [["status"], ["set", "40"], ["rollback"], ["promote"], ["analyze", "--prometheus-url", "x"]],
)
def test_a_rollout_command_ends_with_a_message_when_the_api_never_answers(
    command, tmp_path, monkeypatch, capsys
):
    with SilentServer() as silent:
        server = f"http://127.0.0.1:{silent.port}"
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "kubeconfig", server)))
        action, *rest = command
        code, took = _main_within(
            ["rollout", action, "fineserve", *rest, "--request-timeout", "1",
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
            limit=60,
        )  # fmt: skip
    assert code == 2, f"still waiting after {took:.0f}s" if code is None else code
    assert took < 15, took  # one retry: two waits of 1 s, not four
    err = capsys.readouterr().err
    assert (
        f"fineserve rollout: the Kubernetes API at {server} did not answer within 1s (2 tries) "
        "to get InferenceService 'fineserve' in namespace 'ns'"
    ) in err, err
    assert "Traceback" not in err


def test_requests_wait_30s_for_an_answer_and_10s_for_a_connection_by_default(tmp_path):
    with SilentServer() as silent:
        path = _kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{silent.port}")
        assert Cluster(context="hung", config_file=str(path)).timeout == (10.0, 30.0)
        assert Cluster(context="hung", config_file=str(path), timeout=5).timeout == (5, 5)
