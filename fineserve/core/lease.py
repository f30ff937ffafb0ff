"""One holder at a time for work on an InferenceService: a `coordination.k8s.io/v1` Lease.

Not an annotation of the InferenceService: KServe copies the InferenceService's annotations
(all but a short disallow list, `ServiceAnnotationDisallowedList` in KServe's
pkg/constants/constants.go) into the pod template of each predictor Deployment and into the
Knative revision template (pkg/controller/v1beta1/inferenceservice/components/predictor.go,
buildPredictorResources), so every renewal would roll the Deployments or make a new revision.

The Lease `<InferenceService>-<purpose>` sits beside the InferenceService, owned by it (the
garbage collector deletes it with it). Its fields mean what they mean to client-go's leader
election (k8s.io/client-go/tools/leaderelection: resourcelock/leaselock.go for the fields,
leaderelection.go `tryAcquireOrRenew` and `release` for the rules):

- ``holderIdentity`` holds it until ``renewTime`` + ``leaseDurationSeconds``; while that is in
  the future nobody else takes it;
- taking it sets ``acquireTime`` and counts ``leaseTransitions``; renewing moves ``renewTime``;
- giving it back clears ``holderIdentity`` (``leaseDurationSeconds`` 1), so the next taker
  does not wait for the expiry.

Every write carries the ``resourceVersion`` it was decided on: when two take it at once, one
write gets 409 and that taker decides again on a fresh read. Expiry is judged by the local
clock against the holder's ``renewTime``: clocks that disagree by more than the margin of the
lease's duration can let a lease lapse early or late.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fineserve.core.cluster import CONFLICT_RETRIES, Conflict, NotFound
from fineserve.core.errors import ClusterError
from fineserve.core.inference_service import API_VERSION, GROUP, KIND

if TYPE_CHECKING:
    from fineserve.core.cluster import Cluster


def default_holder() -> str:
    """This process, as a holder: ``host/pid/random``."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def lease_name(name: str, purpose: str) -> str:
    """The Lease that guards ``purpose`` on the InferenceService ``name``."""
    return f"{name}-{purpose}"


@dataclass
class Lease:
    """This holder's claim on ``purpose`` for the InferenceService ``name``, ``ttl`` s long."""

    cluster: Cluster
    name: str
    purpose: str
    ttl: float
    holder: str = field(default_factory=default_holder)
    clock: Callable[[], float] = time.time
    expires: float = field(default=0.0, init=False)  # of the lease last taken or renewed

    @property
    def object_name(self) -> str:
        """The Lease object's name."""
        return lease_name(self.name, self.purpose)

    def describe(self) -> str:
        """How a person finds the Lease (for messages)."""
        return f"Lease {self.object_name!r} in namespace {self.cluster.namespace!r}"

    def acquire(self) -> None:
        """Take or renew the lease; a ClusterError naming the holder and expiry when it is held."""
        for _ in range(CONFLICT_RETRIES):
            current = self._read()
            now = self.clock()
            if current is None:
                body = self._spec_body(now, transitions=0, acquired=now)
                body["metadata"] = {"name": self.object_name, "ownerReferences": self._owner()}
                write = ("create", self.cluster.namespace, body)
            else:
                spec = current.spec
                held_by, until = _live_holder(current, now) or ("", 0.0)
                if held_by and held_by != self.holder:
                    raise ClusterError(
                        f"InferenceService {self.name!r}: {held_by} holds the {self.purpose} "
                        f"lease until {_clock_time(until)} ({self.describe()}); wait for it, "
                        f"or, if that holder died, delete the Lease (kubectl -n "
                        f"{self.cluster.namespace} delete lease {self.object_name})"
                    )
                ours = spec.holder_identity == self.holder
                body = self._spec_body(
                    now,
                    transitions=(spec.lease_transitions or 0) + (0 if ours else 1),
                    acquired=_seconds(spec.acquire_time) if ours else now,
                )
                body["metadata"] = _metadata(current)
                write = ("replace", self.object_name, self.cluster.namespace, body)
            try:
                self._request(*write)
            except Conflict:
                continue  # another taker wrote in between: decide again on what it wrote
            self.expires = now + self.ttl
            return
        raise ClusterError(
            f"{self.describe()} kept changing under us: {CONFLICT_RETRIES} writes in a row were "
            "refused as stale (409); try again"
        )

    def holder_now(self) -> tuple[str, float] | None:
        """Who holds the lease and until when (seconds since the epoch); None: nobody."""
        return _live_holder(self._read(), self.clock())

    def release(self) -> None:
        """Give the lease back if it is still ours (as client-go's leader election does)."""
        for _ in range(CONFLICT_RETRIES):
            current = self._read()
            if current is None or current.spec.holder_identity != self.holder:
                return
            now = self.clock()
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": _metadata(current),
                "spec": {
                    "holderIdentity": "",
                    "leaseDurationSeconds": 1,
                    "acquireTime": _micro_time(now),
                    "renewTime": _micro_time(now),
                    "leaseTransitions": current.spec.lease_transitions or 0,
                },
            }
            try:
                self._request("replace", self.object_name, self.cluster.namespace, body)
            except Conflict:
                continue
            return
        raise ClusterError(f"{self.describe()} kept changing under us; it was not given back")

    # ------------------------------------------------------------------ internals

    def _request(self, verb: str, *args: Any) -> Any:
        """One call of the Kubernetes client's CoordinationV1Api, with the cluster's timeouts."""
        from kubernetes import client

        api = client.CoordinationV1Api(self.cluster.api_client)
        call = {
            "get": api.read_namespaced_lease,
            "create": api.create_namespaced_lease,
            "replace": api.replace_namespaced_lease,
        }[verb]
        return self.cluster.request(verb, self.describe(), functools.partial(call, *args))

    def _read(self) -> Any:
        """The Lease (the client's V1Lease), or None when there is none."""
        try:
            return self._request("get", self.object_name, self.cluster.namespace)
        except NotFound:
            return None

    def _spec_body(self, now: float, *, transitions: int, acquired: float) -> dict:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": max(1, round(self.ttl)),
                "acquireTime": _micro_time(acquired),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
        }

    def _owner(self) -> list[dict]:
        """An owner reference to the InferenceService: the Lease goes when it goes."""
        isvc = self.cluster.require(self.name)
        return [
            {
                "apiVersion": f"{GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": self.name,
                "uid": isvc["metadata"]["uid"],
            }
        ]


def _metadata(lease: Any) -> dict:
    """What a replace of ``lease`` keeps of its metadata (resourceVersion: the optimistic lock)."""
    meta = lease.metadata
    kept: dict[str, Any] = {"name": meta.name, "resourceVersion": meta.resource_version}
    if meta.owner_references:
        from kubernetes.client import ApiClient

        kept["ownerReferences"] = ApiClient().sanitize_for_serialization(meta.owner_references)
    if meta.labels:
        kept["labels"] = meta.labels
    if meta.annotations:
        kept["annotations"] = meta.annotations
    return kept


def _live_holder(lease: Any, now: float) -> tuple[str, float] | None:
    """The holder of ``lease`` and when it lapses, while it has one and has not lapsed."""
    if lease is None or not lease.spec.holder_identity:
        return None
    renewed = _seconds(lease.spec.renew_time)
    until = renewed + (lease.spec.lease_duration_seconds or 0) if renewed else 0.0
    return (lease.spec.holder_identity, until) if until > now else None


def _seconds(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _micro_time(seconds: float) -> str:
    """A `metav1.MicroTime` as the API takes it (RFC 3339, exactly six fractional digits)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clock_time(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))
