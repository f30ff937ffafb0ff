"""An in-process fake Kubernetes API server over real HTTP, for the `kubernetes` client and kubectl.

It keeps the parts of the API contract fineserve relies on: resourceVersion with 409 on a stale
write and on creating a taken name, 422 for an update without resourceVersion (custom
resources), GET/LIST/WATCH, POST, PUT, merge patch (RFC 7386), JSON patch (RFC 6902; a failed
`test` is 422), 415 for strategic-merge and apply patches on custom resources, DELETE, the
status subresource (generation moves only with .spec), 404, 401, and 403 from RBAC Roles and
RoleBindings stored in it; discovery and a Table for `kubectl get isvc` with KServe's printer
columns. InferenceService bodies are validated strictly against the kserve SDK's models.
Every request is recorded (user, authorization verb, group, resource, code) for RBAC tests.
"""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
import queue
import ssl
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    status: bool = False  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind(
        "serving.kserve.io",
        "v1beta1",
        "inferenceservices",
        "InferenceService",
        True,
        ("isvc",),
        True,
    ),
    Kind("", "v1", "namespaces", "Namespace", False, ("ns",)),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    Kind("", "v1", "secrets", "Secret"),
    Kind("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    # the canary analysis' lease; as for every kind here, an update must carry the
    # resourceVersion it read (Kubernetes pkg/registry/coordination/lease/strategy.go,
    # AllowUnconditionalUpdate false; a stale one is 409)
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
]
BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
BY_API = {(k.api_version, k.kind): k for k in KINDS}

# KServe's additionalPrinterColumns for InferenceService (config/crd, v1beta1)
ISVC_COLUMNS = [
    ("URL", "string", lambda o: o.get("status", {}).get("url", "")),
    ("Ready", "string", lambda o: _condition(o, "Ready")),
    ("Prev", "integer", lambda o: _traffic(o, lambda t: t.get("tag") == "prev")),
    ("Latest", "integer", lambda o: _traffic(o, lambda t: t.get("latestRevision") is True)),
    (
        "PrevRolledoutRevision",
        "string",
        lambda o: _predictor(o).get("previousRolledoutRevision", ""),
    ),
    ("LatestReadyRevision", "string", lambda o: _predictor(o).get("latestReadyRevision", "")),
]


def _predictor(obj: dict) -> dict:
    return (obj.get("status", {}).get("components") or {}).get("predictor") or {}


def _traffic(obj: dict, which) -> int | str:
    return next((t.get("percent", 0) for t in _predictor(obj).get("traffic") or [] if which(t)), "")


def _condition(obj: dict, kind: str) -> str:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition.get("status", "")
    return ""


@dataclass(frozen=True)
class Request:
    user: str
    verb: str
    api_group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int
    method: str
    path: str


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


# --------------------------------------------------------------------------- patches


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, tokens: list[str], path: str):
    node = doc
    for token in tokens[:-1]:
        try:
            node = node[int(token)] if isinstance(node, list) else node[token]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(
                422, "Invalid", f"the server rejected our request: doc is missing path: {path}"
            ) from None
    return node


def json_patch(doc, operations: list) -> dict:
    """RFC 6902."""
    doc = copy.deepcopy(doc)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        tokens = _pointer(path)

        def get(tokens=tokens, path=path):
            node = _parent(doc, tokens, path)
            last = tokens[-1]
            try:
                return node[int(last)] if isinstance(node, list) else node[last]
            except (KeyError, IndexError, ValueError):
                raise ApiError(
                    422, "Invalid", f"the server rejected our request: doc is missing path: {path}"
                ) from None

        def remove(tokens=tokens, path=path):
            value = get(tokens, path)
            node = _parent(doc, tokens, path)
            if isinstance(node, list):
                node.pop(int(tokens[-1]))
            else:
                del node[tokens[-1]]
            return value

        def add(value, tokens=tokens, path=path):
            node = _parent(doc, tokens, path)
            last = tokens[-1]
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), value)
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise ApiError(
                    422, "Invalid", f"the server rejected our request: cannot add at {path}"
                )

        if kind == "test":
            if get() != op.get("value"):
                raise ApiError(
                    422, "Invalid", f"the server rejected our request: testing value {path} failed"
                )
        elif kind == "remove":
            remove()
        elif kind == "add":
            add(copy.deepcopy(op["value"]))
        elif kind == "replace":
            get()
            node = _parent(doc, tokens, path)
            if isinstance(node, list):
                node[int(tokens[-1])] = copy.deepcopy(op["value"])
            else:
                node[tokens[-1]] = copy.deepcopy(op["value"])
        elif kind in ("move", "copy"):
            source = _pointer(op["from"])
            value = (
                remove(source, op["from"])
                if kind == "move"
                else copy.deepcopy(get(source, op["from"]))
            )
            add(value)
        else:
            raise ApiError(422, "Invalid", f"unexpected JSON patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------- the server


class FakeKube:
    """The fake API server; a context manager."""

    def __init__(self, namespaces=("fineserve",)):
        self._lock = threading.RLock()
        self._store: dict[tuple, dict] = {}
        self._rv = itertools.count(1000)
        self._events: list[tuple[int, str, dict]] = []
        self._tokens: dict[str, str] = {}
        self.requests: list[Request] = []
        self._callbacks = []
        self._changes: queue.Queue = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        for namespace in namespaces:
            self.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # clients hanging up
        # TLS, as a real API server: client-go (kubectl) sends bearer tokens over HTTPS only
        self._cert, key = _certificate()
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(self._cert, key)
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"

    # -- lifecycle
    def start(self) -> FakeKube:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        threading.Thread(target=self._dispatch, daemon=True).start()
        return self

    def stop(self) -> None:
        self._changes.put(None)
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- kubeconfig
    def kubeconfig_dict(self, *, user="admin", namespace="fineserve", context="fake") -> dict:
        token = next((t for t, u in self._tokens.items() if u == user), None)
        if token is None:
            token = f"token-{uuid.uuid4().hex}"
            self._tokens[token] = user
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(
                            Path(self._cert).read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": "fake", "user": user, "namespace": namespace},
                }
            ],
            "current-context": context,
        }

    def kubeconfig(self, path, *, user="admin", namespace="fineserve", context="fake") -> Path:
        path = Path(path)
        path.write_text(
            yaml.safe_dump(self.kubeconfig_dict(user=user, namespace=namespace, context=context))
        )
        return path

    # -- direct access (tests, the emulated controller)
    def clear_requests(self) -> None:
        self.requests.clear()

    def get(self, group, version, plural, namespace, name) -> dict | None:
        with self._lock:
            found = self._store.get((group, plural, namespace, name))
            return copy.deepcopy(found) if found else None

    def put(self, obj: dict) -> dict:
        kind = BY_API[(obj["apiVersion"], obj["kind"])]
        meta = obj["metadata"]
        with self._lock:
            key = (
                kind.group,
                kind.plural,
                meta.get("namespace", "") if kind.namespaced else "",
                meta["name"],
            )
            old = self._store.get(key)
            new = copy.deepcopy(obj)
            if old is None:
                self._initialize(new)
            else:
                new["metadata"] = {
                    **old["metadata"],
                    **{k: v for k, v in new["metadata"].items() if k != "resourceVersion"},
                }
                if kind.status and old.get("spec") != new.get("spec"):
                    new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            return self._commit(key, new, "ADDED" if old is None else "MODIFIED")

    def update_status(self, group, version, plural, namespace, name, status: dict) -> dict:
        with self._lock:
            key = (group, plural, namespace, name)
            obj = copy.deepcopy(self._store[key])
            obj["status"] = copy.deepcopy(status)
            return self._commit(key, obj, "MODIFIED")

    def on_change(self, callback) -> None:
        self._callbacks.append(callback)

    def wait_idle(self, timeout: float = 5) -> None:
        with self._idle:
            assert self._idle.wait_for(lambda: self._pending == 0, timeout), "changes still queued"

    # -- internals
    def _initialize(self, obj: dict) -> None:
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = 1

    def _commit(self, key, obj, event: str) -> dict:
        rv = next(self._rv)
        obj["metadata"]["resourceVersion"] = str(rv)
        if event == "DELETED":
            self._store.pop(key, None)
        else:
            self._store[key] = obj
        self._events.append((rv, event, copy.deepcopy(obj)))
        with self._idle:
            self._pending += 1
        self._changes.put((event, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def _dispatch(self) -> None:
        while True:
            item = self._changes.get()
            if item is None:
                return
            try:
                for callback in list(self._callbacks):
                    callback(*item)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _authorize(
        self, user: str, verb: str, kind: Kind, sub: str, namespace: str, name: str
    ) -> None:
        if user == "admin":
            return
        resource = kind.plural + (f"/{sub}" if sub else "")
        with self._lock:
            roles = {
                (k[2], k[3]): v
                for k, v in self._store.items()
                if k[:2] == ("rbac.authorization.k8s.io", "roles")
            }
            bindings = [
                v
                for k, v in self._store.items()
                if k[:2] == ("rbac.authorization.k8s.io", "rolebindings")
            ]
        for binding in bindings:
            ns = binding["metadata"].get("namespace", "")
            if ns != namespace or not any(
                _is_subject(s, user, ns) for s in binding.get("subjects", [])
            ):
                continue
            role = roles.get((ns, binding["roleRef"]["name"]))
            for rule in (role or {}).get("rules", []):
                if (
                    _matches(kind.group, rule.get("apiGroups", []))
                    and _matches(resource, rule.get("resources", []))
                    and _matches(verb, rule.get("verbs", []))
                    and (not rule.get("resourceNames") or name in rule["resourceNames"])
                ):
                    return
        what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
        target = f' "{name}"' if name else ""
        raise ApiError(
            403,
            "Forbidden",
            f'{what}{target} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
            f'in API group "{kind.group}" in the namespace "{namespace}"',
            {"name": name, "group": kind.group, "kind": kind.plural},
        )


@functools.cache
def _certificate() -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made once per process with openssl)."""
    folder = Path(tempfile.mkdtemp(prefix="fake-kube-tls-"))
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=fake-kube"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def _is_subject(subject: dict, user: str, namespace: str) -> bool:
    if subject.get("kind") == "ServiceAccount":
        return (
            user == f"system:serviceaccount:{subject.get('namespace', namespace)}:{subject['name']}"
        )
    return subject.get("kind") == "User" and subject.get("name") == user


def _matches(value: str, allowed: list[str]) -> bool:
    return value in allowed or "*" in allowed


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler(fake: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_PATCH(self):
            self._serve("PATCH")

        def do_DELETE(self):
            self._serve("DELETE")

        # -- plumbing
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                try:
                    return yaml.safe_load(raw)
                except yaml.YAMLError:
                    raise ApiError(400, "BadRequest", "the body is neither JSON nor YAML") from None

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            parts = [p for p in split.path.split("/") if p]
            record = {
                "user": "",
                "verb": "",
                "api_group": "",
                "resource": "",
                "subresource": "",
                "namespace": "",
                "name": "",
            }
            try:
                discovery = self._discovery(parts)
                if discovery is not None:
                    return self._send(200, discovery)
                kind, namespace, name, sub = self._route(parts)
                record.update(
                    api_group=kind.group,
                    resource=kind.plural,
                    subresource=sub,
                    namespace=namespace,
                    name=name,
                )
                watch = (query.get("watch") or "").lower() in ("true", "1")
                verb = {
                    "GET": "watch" if watch else ("get" if name else "list"),
                    "POST": "create",
                    "PUT": "update",
                    "PATCH": "patch",
                    "DELETE": "delete",
                }[method]
                record["verb"] = verb
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                user = fake._tokens.get(token)
                if user is None:
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                record["user"] = user
                fake._authorize(user, verb, kind, sub, namespace, name)
                if watch:
                    fake.requests.append(Request(**record, code=200, method=method, path=self.path))
                    return self._watch(kind, namespace, query)
                code, body = self._handle(method, kind, namespace, name, sub, query)
            except ApiError as err:
                code, body = err.code, err.status()
            fake.requests.append(Request(**record, code=code, method=method, path=self.path))
            self._send(code, body)

        def _discovery(self, parts: list[str]) -> dict | None:
            if parts == ["version"]:
                return {
                    "major": "1",
                    "minor": "32",
                    "gitVersion": "v1.32.0-fake",
                    "platform": "linux/amd64",
                }
            if parts == ["api"]:
                return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            if parts == ["apis"]:
                groups = sorted({(k.group, k.version) for k in KINDS if k.group})
                return {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                            "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                        }
                        for g, v in groups
                    ],
                }
            if parts in (["api", "v1"],) or (len(parts) == 3 and parts[0] == "apis"):
                group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
                kinds = [k for k in KINDS if (k.group, k.version) == (group, version)]
                if not kinds:
                    raise ApiError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                resources = []
                for k in kinds:
                    resources.append(
                        {
                            "name": k.plural,
                            "singularName": k.kind.lower(),
                            "namespaced": k.namespaced,
                            "kind": k.kind,
                            "verbs": [
                                "create",
                                "delete",
                                "get",
                                "list",
                                "patch",
                                "update",
                                "watch",
                            ],
                            "shortNames": list(k.short_names),
                        }
                    )
                    if k.status:
                        resources.append(
                            {
                                "name": f"{k.plural}/status",
                                "singularName": "",
                                "namespaced": k.namespaced,
                                "kind": k.kind,
                                "verbs": ["get", "patch", "update"],
                            }
                        )
                return {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version,
                    "resources": resources,
                }
            if parts and parts[0] == "openapi":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return None

        def _route(self, parts: list[str]):
            if parts[:2] == ["api", "v1"]:
                group, version, rest = "", "v1", parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            else:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            namespace = ""
            if len(rest) >= 3 and rest[0] == "namespaces":
                namespace, rest = rest[1], rest[2:]
            elif rest[:1] == ["namespaces"]:
                pass
            kind = BY_PATH.get((group, version, rest[0] if rest else ""))
            if kind is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            name = rest[1] if len(rest) > 1 else ""
            sub = rest[2] if len(rest) > 2 else ""
            if sub and not (sub == "status" and kind.status):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return kind, namespace, name, sub

        def _not_found(self, kind: Kind, name: str) -> ApiError:
            what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
            return ApiError(
                404,
                "NotFound",
                f'{what} "{name}" not found',
                {"name": name, "group": kind.group, "kind": kind.plural},
            )

        def _handle(self, method, kind: Kind, namespace, name, sub, query):
            key = (kind.group, kind.plural, namespace, name)
            with fake._lock:
                current = fake._store.get(key)
                if method == "GET":
                    if not name:
                        return 200, self._list(kind, namespace, query)
                    if current is None:
                        raise self._not_found(kind, name)
                    return 200, self._maybe_table(kind, [current], single=True)
                if method == "POST":
                    body = self._body() or {}
                    meta = body.setdefault("metadata", {})
                    if not meta.get("name") and meta.get("generateName"):
                        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                    name = meta.get("name", "")
                    if kind.namespaced:
                        meta["namespace"] = namespace
                        if ("", "namespaces", "", namespace) not in fake._store:
                            raise ApiError(
                                404,
                                "NotFound",
                                f'namespaces "{namespace}" not found',
                                {"name": namespace, "kind": "namespaces"},
                            )
                    key = (kind.group, kind.plural, namespace, name)
                    if key in fake._store:
                        what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
                        raise ApiError(
                            409,
                            "AlreadyExists",
                            f'{what} "{name}" already exists',
                            {"name": name, "group": kind.group, "kind": kind.plural},
                        )
                    if kind.status:
                        body.pop("status", None)
                    meta.pop("resourceVersion", None)
                    self._validate(kind, body)
                    fake._initialize(body)
                    return 201, fake._commit(key, body, "ADDED")
                if current is None:
                    raise self._not_found(kind, name)
                if method == "DELETE":
                    fake._commit(key, copy.deepcopy(current), "DELETED")
                    return 200, current
                if method == "PUT":
                    desired = self._body() or {}
                    sent_rv = (desired.get("metadata") or {}).get("resourceVersion")
                    if kind.group and not sent_rv:
                        raise ApiError(
                            422,
                            "Invalid",
                            f'{kind.kind} "{name}" is invalid: metadata.resourceVersion: '
                            "Invalid value: 0x0: must be specified for an update",
                        )
                else:  # PATCH
                    desired = self._patched(kind, current)
                    sent_rv = (desired.get("metadata") or {}).get("resourceVersion")
                    if sent_rv == current["metadata"]["resourceVersion"]:
                        sent_rv = None  # carried over from the stored object, not sent
                if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                    what = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {what} "{name}": the object has been '
                        "modified; please apply your changes to the latest version and try again",
                        {"name": name, "group": kind.group, "kind": kind.plural},
                    )
                new = copy.deepcopy(current)
                if sub == "status":
                    new["status"] = desired.get("status")
                else:
                    for field, value in desired.items():
                        if field not in ("metadata", "status", "apiVersion", "kind"):
                            new[field] = value
                    for field in [
                        f
                        for f in new
                        if f not in desired
                        and f not in ("metadata", "status", "apiVersion", "kind")
                    ]:
                        del new[field]
                    if not kind.status and "status" in desired:
                        new["status"] = desired["status"]
                    meta = desired.get("metadata") or {}
                    for field in ("labels", "annotations"):
                        if meta.get(field):
                            new["metadata"][field] = meta[field]
                        else:
                            new["metadata"].pop(field, None)
                    self._validate(kind, new)
                    if kind.status and new.get("spec") != current.get("spec"):
                        new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
                return 200, fake._commit(key, new, "MODIFIED")

        def _patched(self, kind: Kind, current: dict) -> dict:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            patch = self._body()
            if content_type == "application/merge-patch+json":
                return merge_patch(current, patch)
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                return json_patch(current, patch)
            if content_type == "application/strategic-merge-patch+json" and not kind.group:
                return merge_patch(current, patch)
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json (got {content_type})",
            )

        def _validate(self, kind: Kind, obj: dict) -> None:
            if kind.kind != "InferenceService":
                return
            from kserve_validation import validate_inference_service

            checked = {k: v for k, v in obj.items() if k != "status"}
            checked["metadata"] = {
                k: v
                for k, v in obj.get("metadata", {}).items()
                if k in ("name", "namespace", "labels", "annotations")
            }
            try:
                validate_inference_service(checked)
            except AssertionError as err:
                raise ApiError(
                    422,
                    "Invalid",
                    f'InferenceService "{obj["metadata"].get("name")}" is invalid: {err}',
                ) from None

        def _selected(self, obj: dict, query: dict) -> bool:
            labels = obj["metadata"].get("labels") or {}
            for term in filter(None, (query.get("labelSelector") or "").split(",")):
                if "!=" in term:
                    k, v = term.split("!=", 1)
                    if labels.get(k) == v:
                        return False
                elif "=" in term:
                    k, v = term.replace("==", "=").split("=", 1)
                    if labels.get(k) != v:
                        return False
                elif term not in labels:
                    return False
            for term in filter(None, (query.get("fieldSelector") or "").split(",")):
                k, _, v = term.partition("=")
                if k == "metadata.name" and obj["metadata"]["name"] != v:
                    return False
                if k == "metadata.namespace" and obj["metadata"].get("namespace") != v:
                    return False
            return True

        def _list(self, kind: Kind, namespace: str, query: dict) -> dict:
            items = [
                copy.deepcopy(v)
                for (g, p, ns, _), v in sorted(fake._store.items())
                if (g, p) == (kind.group, kind.plural)
                and (not namespace or ns == namespace)
                and self._selected(v, query)
            ]
            return self._maybe_table(kind, items, single=False)

        def _maybe_table(self, kind: Kind, items: list[dict], single: bool) -> dict:
            accept = self.headers.get("Accept") or ""
            latest = str(max([e[0] for e in fake._events] or [0]))
            if "as=Table" not in accept:
                if single:
                    return copy.deepcopy(items[0])
                return {
                    "kind": f"{kind.kind}List",
                    "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": latest},
                    "items": items,
                }
            columns = [("Name", "string", lambda o: o["metadata"]["name"])]
            if kind.kind == "InferenceService":
                columns += ISVC_COLUMNS
            columns.append(("Age", "date", lambda o: o["metadata"].get("creationTimestamp", "")))
            return {
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": latest},
                "columnDefinitions": [
                    {
                        "name": n,
                        "type": t,
                        "format": "name" if n == "Name" else "",
                        "description": "",
                        "priority": 0,
                    }
                    for n, t, _ in columns
                ],
                "rows": [
                    {
                        "cells": [f(o) for _, _, f in columns],
                        "object": {
                            "kind": "PartialObjectMetadata",
                            "apiVersion": "meta.k8s.io/v1",
                            "metadata": o["metadata"],
                        },
                    }
                    for o in items
                ],
            }

        def _watch(self, kind: Kind, namespace: str, query: dict) -> None:
            import time

            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def wanted(obj: dict) -> bool:
                same = (obj["apiVersion"], obj["kind"]) == (kind.api_version, kind.kind)
                return (
                    same
                    and (not namespace or obj["metadata"].get("namespace") == namespace)
                    and self._selected(obj, query)
                )

            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
            start = query.get("resourceVersion")
            with fake._lock:
                if start in (None, "", "0"):
                    seen = max([e[0] for e in fake._events] or [0])
                    for (g, p, _ns, _), obj in sorted(fake._store.items()):
                        if (g, p) == (kind.group, kind.plural) and wanted(obj):
                            send({"type": "ADDED", "object": obj})
                else:
                    seen = int(start)
            try:
                while time.monotonic() < deadline:
                    with fake._lock:
                        new = [e for e in fake._events if e[0] > seen]
                    for rv, event, obj in new:
                        seen = rv
                        if wanted(obj):
                            send({"type": event, "object": obj})
                    time.sleep(0.02)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler
