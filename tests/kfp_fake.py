"""An in-process fake of the Kubeflow Pipelines v2beta1 REST API, over real HTTP.

It answers what `kfp.Client` (2.17) sends for submit and schedule: healthz, experiments,
pipelines and versions (multipart uploads), runs and recurring runs (create, list, get,
enable, disable, delete). Every JSON body sent is checked against the `kfp-server-api` models
(a field the model does not have fails the request with 400, as the real server's strict
decoding does); bearer tokens are checked (401), and each token may use some namespaces only
(403). Uploaded packages and created objects are kept for the tests to inspect.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kfp_server_api

API = "/apis/v2beta1"


class BadRequest(Exception):
    """A request the real API refuses with 400."""


def check_model(body, type_name: str, where: str = "body") -> None:
    """``body`` fits the kfp-server-api model ``type_name``: no unknown fields, right shapes."""
    if body is None or type_name in ("object", "datetime", "str", "bool", "int", "float"):
        return
    if type_name.startswith("list["):
        if not isinstance(body, list):
            raise BadRequest(f"{where}: expected a list")
        for i, item in enumerate(body):
            check_model(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        if not isinstance(body, dict):
            raise BadRequest(f"{where}: expected an object")
        return
    klass = getattr(kfp_server_api, type_name, None)
    if klass is None:
        raise BadRequest(f"{where}: the model {type_name} does not exist")
    if not klass.openapi_types:  # an enum: one of its values, as a string
        allowed = {v for k, v in vars(klass).items() if k.isupper()}
        if body not in allowed:
            raise BadRequest(f"{where}: {body!r} is not one of {sorted(allowed)}")
        return
    if not isinstance(body, dict):
        raise BadRequest(f"{where}: expected a {type_name} object")
    by_json = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    for key, value in body.items():
        if key not in by_json:
            raise BadRequest(f"{where}: unknown field {key!r} for {type_name}")
        check_model(value, klass.openapi_types[by_json[key]], f"{where}.{key}")


@dataclass
class Request:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict
    body: object
    token: str | None
    code: int = 0


@dataclass
class FakeKFP:
    """The fake API. ``tokens`` maps a bearer token to the namespaces it may use."""

    tokens: dict[str, set[str]] = field(default_factory=dict)
    multi_user: bool = True
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)  # id -> fields + "package"
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _serve(self, method: str) -> None:
                fake._handle(self, method)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeKFP:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def writes(self) -> list[Request]:
        """The requests that would change state (POST, DELETE)."""
        return [r for r in self.requests if r.method in ("POST", "DELETE")]

    # ------------------------------------------------------------------ dispatch

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        auth = handler.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        content_type = handler.headers.get("Content-Type", "")
        body: object = None
        request = Request(method, split.path, query, None, token)
        try:
            if "multipart/form-data" in content_type:
                body = _multipart(raw, content_type)
            elif raw:
                body = json.loads(raw)
            request.body = body
            code, answer = self._route(method, split.path, query, body, token)
        except BadRequest as err:
            code, answer = 400, {"error": str(err), "code": 3, "message": str(err)}
        request.code = code
        with self._lock:
            self.requests.append(request)
        payload = json.dumps(answer).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(self, method, path, query, body, token):
        if token not in self.tokens:
            return _error(401, "Unauthorized: missing or invalid token")
        namespaces = self.tokens[token]
        if path == f"{API}/healthz":
            return 200, {"commit_sha": "fake", "tag_name": "2.5.0", "multi_user": self.multi_user}
        namespace = query.get("namespace") or (body or {}).get("namespace")
        if isinstance(body, dict) and "namespace" in body and body["namespace"] not in namespaces:
            return _error(403, f"namespace {body['namespace']!r} is not accessible")
        if namespace and namespace not in namespaces:
            return _error(403, f"namespace {namespace!r} is not accessible")
        with self._lock:
            return self._dispatch(method, path, query, body, namespaces)

    def _dispatch(self, method, path, query, body, namespaces):
        if path == f"{API}/experiments" and method == "GET":
            found = [e for e in self.experiments.values() if _matches(e, query)]
            return 200, {"experiments": found, "total_size": len(found)}
        if path == f"{API}/experiments" and method == "POST":
            check_model(body, "V2beta1Experiment")
            created = {**body, "experiment_id": str(uuid.uuid4())}
            self.experiments[created["experiment_id"]] = created
            return 200, created
        if path == f"{API}/pipelines" and method == "GET":
            found = [p for p in self.pipelines.values() if _matches(p, query)]
            return 200, {"pipelines": found, "total_size": len(found)}
        if path == f"{API}/pipelines/upload" and method == "POST":
            return self._upload(query, body, pipeline_id=None)
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            if query.get("pipelineid") not in self.pipelines:
                return _error(404, f"pipeline {query.get('pipelineid')!r} not found")
            return self._upload(query, body, pipeline_id=query["pipelineid"])
        match = re.fullmatch(rf"{API}/pipelines/([^/]+)/versions", path)
        if match and method == "GET":
            found = [v for v in self.versions.values() if v["pipeline_id"] == match[1]]
            return 200, {"pipeline_versions": [_public(v) for v in found]}
        if path == f"{API}/runs" and method == "POST":
            check_model(body, "V2beta1Run")
            self._check_references(body)
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if path == f"{API}/recurringruns" and method == "POST":
            check_model(body, "V2beta1RecurringRun")
            self._check_references(body)
            cron = (((body.get("trigger") or {}).get("cron_schedule")) or {}).get("cron")
            if cron is not None and len(cron.split()) != 6:
                raise BadRequest(f"cron {cron!r}: robfig/cron v1 expects six fields")
            run = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
            self.recurring_runs[run["recurring_run_id"]] = run
            return 200, run
        if path == f"{API}/recurringruns" and method == "GET":
            return 200, {"recurringRuns": list(self.recurring_runs.values())}
        match = re.fullmatch(rf"{API}/recurringruns/([^/:]+)(:enable|:disable)?", path)
        if match:
            run = self.recurring_runs.get(match[1])
            if run is None:
                return _error(404, f"recurring run {match[1]!r} not found")
            if method == "GET":
                return 200, run
            if method == "DELETE":
                del self.recurring_runs[match[1]]
                return 200, {}
            if method == "POST" and match[2]:
                run["status"] = "ENABLED" if match[2] == ":enable" else "DISABLED"
                return 200, {}
        return _error(404, f"no route {method} {path}")

    def _upload(self, query, body, pipeline_id):
        if not isinstance(body, dict) or "uploadfile" not in body:
            raise BadRequest("multipart field 'uploadfile' is missing")
        if pipeline_id is None:
            pipeline_id = str(uuid.uuid4())
            pipeline = {
                "pipeline_id": pipeline_id,
                "display_name": query.get("name") or query.get("display_name"),
                "namespace": query.get("namespace", ""),
            }
            self.pipelines[pipeline_id] = pipeline
            answer = pipeline
        version_id = str(uuid.uuid4())
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": version_id,
            "display_name": query.get("name") or query.get("display_name"),
            "package": body["uploadfile"],
        }
        self.versions[version_id] = version
        return 200, answer if query.get("pipelineid") is None else _public(version)

    def _check_references(self, body: dict) -> None:
        reference = body.get("pipeline_version_reference") or {}
        version = self.versions.get(reference.get("pipeline_version_id"))
        if version is None or version["pipeline_id"] != reference.get("pipeline_id"):
            raise BadRequest(f"pipeline_version_reference {reference} names no pipeline version")
        if body.get("experiment_id") not in self.experiments:
            raise BadRequest(f"experiment {body.get('experiment_id')!r} not found")


def _public(version: dict) -> dict:
    return {k: v for k, v in version.items() if k != "package"}


def _matches(item: dict, query: dict) -> bool:
    if query.get("namespace") and item.get("namespace", query["namespace"]) != query["namespace"]:
        return False
    if "filter" not in query:
        return True
    for predicate in json.loads(query["filter"]).get("predicates", []):
        key = predicate["key"]
        value = predicate.get("stringValue", predicate.get("string_value"))
        if item.get(key) != value:
            return False
    return True


def _error(code: int, message: str):
    return code, {"error": message, "message": message, "code": {401: 16, 403: 7, 404: 5}[code]}


def _multipart(raw: bytes, content_type: str) -> dict:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    return {
        part.get_param("name", header="content-disposition"): part.get_content()
        for part in message.iter_parts()
    }
