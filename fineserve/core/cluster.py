"""Talking to the Kubernetes API about InferenceServices: read, create, change safely, wait.

Changes are read-modify-write with the object's `resourceVersion` (HTTP PUT): when another
writer (KServe's controller, an operator with kubectl) changed the object in between, the API
answers 409, and the change is computed again on a fresh read, never forced over theirs.

The kserve SDK's `KServeClient` is not used for the calls: it turns every API error into a
RuntimeError string (the 404/403/409 status is lost) and always configures the process-wide
client. The objects themselves are built with its models (`fineserve.core.inference_service`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fineserve.core.errors import ClusterError
from fineserve.core.inference_service import API_VERSION, GROUP, PLURAL

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: How often a change is recomputed after a 409 before giving up.
CONFLICT_RETRIES = 5
#: Seconds to wait for a connection, and for each answer, of the Kubernetes API (and
#: Prometheus): a server that accepts a connection and never answers ends the command.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
#: How often a request that got no answer (refused, reset, timed out) is sent again: once, for
#: a kept-alive connection the server closed in between (urllib3 retries reads of GET and PUT
#: only; its default of 3 would keep a command waiting four read timeouts).
REQUEST_RETRIES = 1


def cluster_available(kube_context: str) -> bool:
    """Whether a step has a cluster: a named kubeconfig context, or running inside a pod."""
    return bool(kube_context) or IN_CLUSTER_NAMESPACE.exists()


class Cluster:
    """InferenceServices in one namespace, through a kubeconfig context or in-cluster config."""

    def __init__(
        self,
        context: str = "",
        namespace: str = "",
        config_file: str = "",
        *,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        """Configure the client; ``timeout``: seconds each API request may wait for its answer."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
        from urllib3 import Retry

        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)  # kubernetes' _request_timeout
        configuration = client.Configuration()
        configuration.retries = Retry(total=REQUEST_RETRIES)
        # read at call time: the client reads $KUBECONFIG once, when first imported
        config_file = config_file or os.environ.get("KUBECONFIG", "")
        try:
            if context or config_file or not IN_CLUSTER_NAMESPACE.exists():
                api_client = config.new_client_from_config(
                    config_file=config_file or None,
                    context=context or None,
                    client_configuration=configuration,
                )
                self.namespace = namespace or _context_namespace(context, config_file)
            else:
                config.load_incluster_config(client_configuration=configuration)
                api_client = client.ApiClient(configuration)
                self.namespace = namespace or IN_CLUSTER_NAMESPACE.read_text().strip()
        except (ConfigException, OSError) as err:
            where = f"context {context!r}" if context else "the current kubeconfig context"
            raise ClusterError(
                f"cannot configure the Kubernetes client for {where}: {err}"
            ) from err
        self.host = api_client.configuration.host
        self.api_client = api_client
        self.api = client.CustomObjectsApi(api_client)

    # ------------------------------------------------------------------ requests

    def get(self, name: str) -> dict | None:
        """The InferenceService ``name``, or None when there is none."""
        try:
            return self._call("get", name)
        except NotFound:
            return None

    def require(self, name: str) -> dict:
        """The InferenceService ``name``; a ClusterError naming it when it does not exist."""
        found = self.get(name)
        if found is None:
            raise ClusterError(
                f"InferenceService {name!r} not found in namespace {self.namespace!r} "
                f"(kubectl get isvc -n {self.namespace})"
            )
        return found

    def create(self, body: dict) -> dict:
        """Create ``body``; a ClusterError when the name is taken or the namespace is missing."""
        return self._call("create", body["metadata"]["name"], body)

    def replace(self, body: dict) -> dict:
        """PUT ``body`` (which carries the resourceVersion it was computed from)."""
        return self._call("replace", body["metadata"]["name"], body)

    def change(self, name: str, compute: Callable[[dict], dict | None]) -> tuple[dict, dict, bool]:
        """Apply ``compute(current) -> desired`` (None: no change) with optimistic concurrency.

        Returns (object before, object after, whether it was written). On a 409 the object is
        read again and ``compute`` runs on the fresh copy: a concurrent writer's change is kept,
        and ``compute`` may refuse (raise) on what it now sees.
        """
        for _ in range(CONFLICT_RETRIES):
            current = self.require(name)
            desired = compute(current)
            if desired is None or _same_intent(current, desired):
                return current, current, False
            try:
                return current, self.replace(desired), True
            except Conflict:
                continue
        raise ClusterError(
            f"InferenceService {name!r} kept changing under us: {CONFLICT_RETRIES} writes in a "
            "row were refused as stale (409); try again"
        )

    def wait(
        self,
        name: str,
        judge: Callable[[dict], tuple[bool, str]],
        *,
        timeout: float,
        interval: float = 2.0,
    ) -> tuple[bool, dict, str]:
        """Poll ``name`` until ``judge(obj)`` says done, or ``timeout`` seconds pass.

        ``judge`` returns (done, why not). Returns (done, the last object read, the last why).
        """
        deadline = time.monotonic() + timeout
        while True:
            current = self.require(name)
            done, why = judge(current)
            if done or time.monotonic() >= deadline:
                return done, current, why
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------ errors

    def _call(self, verb: str, name: str, body: dict | None = None) -> Any:
        where = f"InferenceService {name!r} in namespace {self.namespace!r}"
        args = (GROUP, API_VERSION, self.namespace, PLURAL)
        if verb == "get":
            call = functools.partial(self.api.get_namespaced_custom_object, *args, name)
        elif verb == "create":
            call = functools.partial(self.api.create_namespaced_custom_object, *args, body)
        else:
            call = functools.partial(self.api.replace_namespaced_custom_object, *args, name, body)
        return self.request(verb, where, call)

    def request(self, verb: str, where: str, call: Callable[..., Any]) -> Any:
        """``call(_request_timeout=...)``: one API request with this client's timeouts.

        ``verb`` (get, create, replace) and ``where`` (the object) name it in errors: a 404 is
        `NotFound` (for create: a ClusterError, the namespace is missing), a 409 `Conflict`,
        any other failure a ClusterError.
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        # a (connect, read) pair: kubernetes/client/rest.py ignores a float that is not a pair
        timeout = {"_request_timeout": self.timeout}
        try:
            return call(**timeout)
        except ApiException as err:
            message = _api_message(err)
            hint = {
                401: "the credentials were refused: log in again or check the kubeconfig",
                403: "the identity lacks this permission: see the Role in manifests/base",
                404: "does the namespace exist?" if verb == "create" else "",
                409: "it already exists" if verb == "create" else "",
            }.get(err.status, "")
            error = {404: NotFound, 409: Conflict}.get(err.status, ClusterError)
            if verb == "create" and error is NotFound:  # the namespace, not the object
                error = ClusterError
            raise error(
                f"{verb} {where}: HTTP {err.status}: {message}" + (f" ({hint})" if hint else "")
            ) from err
        except HTTPError as err:
            raise ClusterError(f"{self._no_answer(err)} to {verb} {where}") from err

    def _no_answer(self, err: Exception) -> str:
        """What went wrong with a request that got no answer (urllib3's error, after retries)."""
        from urllib3.exceptions import (
            ConnectTimeoutError,
            MaxRetryError,
            NewConnectionError,
            ReadTimeoutError,
        )

        reason = err.reason if isinstance(err, MaxRetryError) and err.reason else err
        tries = f"{1 + REQUEST_RETRIES} tries" if isinstance(err, MaxRetryError) else "1 try"
        connect, read = self.timeout
        if isinstance(reason, ReadTimeoutError):
            return f"the Kubernetes API at {self.host} did not answer within {read:g}s ({tries})"
        if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
            return (
                f"the Kubernetes API at {self.host} did not accept a connection within "
                f"{connect:g}s ({tries})"
            )
        return f"cannot reach the Kubernetes API at {self.host} ({reason})"


class NotFound(ClusterError):
    """The object does not exist (HTTP 404)."""


class Conflict(ClusterError):
    """A write refused as stale, or a create of a name that is taken (HTTP 409)."""


def _api_message(err: Any) -> str:
    import json

    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(err.reason)


def _same_intent(current: dict, desired: dict) -> bool:
    """Whether ``desired`` changes nothing a user set (spec, labels, annotations)."""
    return all(current.get(key) == desired.get(key) for key in ("spec",)) and all(
        (current["metadata"].get(key) or {}) == (desired["metadata"].get(key) or {})
        for key in ("labels", "annotations")
    )


def _context_namespace(context: str, config_file: str) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=config_file or None)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"
