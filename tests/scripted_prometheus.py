"""Stand-ins for Prometheus' query API: a scripted one in-process, and one over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from fineserve.core.canary_analysis import Sample

LABELS = {"negative": 30.0, "neutral": 40.0, "positive": 30.0}


def sample(
    requests=100.0, errors=0.0, p99=0.05, labels=None, confidence=0.8, client_errors=0.0
) -> Sample:
    """One side's metrics over a window; the defaults are a healthy predictor's.

    None is a query Prometheus answered with no series at all.
    """
    return Sample(
        requests=requests,
        errors=errors,
        client_errors=client_errors,
        p99=p99,
        labels=dict(LABELS if labels is None else labels),
        confidence=confidence,
    )


class ScriptedPrometheus:
    """Answers the analysis' queries from a script of windows {version: Sample}.

    Its ``advance`` is the analysis' sleep: each held interval moves to the next window; a
    window that is an exception is raised instead (Ctrl-C).
    """

    def __init__(self, windows: list) -> None:
        self.windows, self.index, self.slept = windows, -1, 0.0

    def advance(self, seconds: float) -> None:
        self.index += 1
        self.slept += seconds
        if isinstance(self.windows[self.index], BaseException):
            raise self.windows[self.index]

    def query(self, promql: str, name: str) -> list[tuple[dict, float]]:
        version = promql.split('model_version="', 1)[1].split('"', 1)[0]
        s = self.windows[self.index].get(version) or sample()
        if name == "labels":
            return [({"label": k}, v) for k, v in s.labels.items()]
        value = getattr(s, name)
        return [] if value is None else [({}, value)]


class PrometheusOverHTTP:
    """A real HTTP server on 127.0.0.1 answering ``/api/v1/query`` with ``answer(promql)``.

    ``answer`` returns the HTTP status and the raw body, so that a test can send anything.
    """

    def __init__(self, answer: Callable[[str], tuple[int, bytes]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                promql = parse_qs(urlparse(self.path).query).get("query", [""])[0]
                outer.queries.append(promql)
                status, body = answer(promql)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.queries: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> PrometheusOverHTTP:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def vector(value: str, **labels: str) -> bytes:
    """An instant-vector answer with one series of ``value`` (as Prometheus writes it)."""
    result = [{"metric": labels, "value": [1700000000.0, value]}]
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()
