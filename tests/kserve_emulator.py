"""KServe's InferenceService controller, emulated on the fake API server: it fills `.status`.

Serverless (Knative) mode: a change of `spec.predictor` other than `canaryTrafficPercent`
creates a revision `<name>-predictor-NNNNN`. Once it is ready, and the previous one was rolled
out, `canaryTrafficPercent: N` gives it N% (tag `latest`) and the last rolled-out revision the
rest (tag `prev`); without the field (or at 100) it gets everything and becomes the rolled-out
one. A revision that never gets ready gets no traffic and the conditions say why
(RevisionFailed). Standard mode: `spec.canary` entries get `status.canaryStatuses` and the
`CanaryPredictorReady` condition; `canaryTrafficPercent` is ignored there, as in KServe.
Status writes bump the resourceVersion, so clients holding an older one get 409s, as with the
real controller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


@dataclass
class _Service:
    revisions: list[tuple[str, str, object]] = field(default_factory=list)  # name, key, ready
    rolled_out: str | None = None
    previous: str | None = None
    ready_by_key: dict[str, object] = field(default_factory=dict)


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict:
    condition = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastTransitionTime": "2026-11-22T00:00:00Z",
    }
    if not ok:
        condition.update(reason=reason, message=message)
    return condition


class KServeController:
    """Reconciles every InferenceService written to ``fake``.

    ``ready(predictor_spec)`` decides, once per predictor version, whether it ever gets ready:
    True, or the failure message.
    """

    def __init__(self, fake, *, ready=lambda predictor: True):
        self.fake = fake
        self.ready = ready
        self._services: dict[tuple[str, str], _Service] = {}
        fake.on_change(self._on_change)

    def revisions(self, namespace: str, name: str) -> list[str]:
        return [r[0] for r in self._services.get((namespace, name), _Service()).revisions]

    def _on_change(self, event: str, obj: dict) -> None:
        if (obj.get("apiVersion"), obj.get("kind")) != (f"{GROUP}/{VERSION}", "InferenceService"):
            return
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if event == "DELETED":
            self._services.pop(key, None)
            return
        current = self.fake.get(GROUP, VERSION, PLURAL, *key)
        if current is None or current["metadata"]["resourceVersion"] != meta["resourceVersion"]:
            return  # a newer write is queued; reconcile that one
        status = self._reconcile(self._services.setdefault(key, _Service()), current)
        if status != current.get("status"):
            self.fake.update_status(GROUP, VERSION, PLURAL, *key, status)

    def _readiness(self, service: _Service, predictor: dict) -> object:
        key = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        if key not in service.ready_by_key:
            service.ready_by_key[key] = self.ready(predictor)
        return service.ready_by_key[key]

    def _reconcile(self, service: _Service, isvc: dict) -> dict:
        meta, spec = isvc["metadata"], isvc["spec"]
        annotations = meta.get("annotations") or {}
        mode = annotations.get("serving.kserve.io/deploymentMode", "Serverless").lower()
        url = f"http://{meta['name']}.{meta.get('namespace', 'default')}.example.com"
        status = {
            "observedGeneration": meta.get("generation", 1),
            "url": url,
            "address": {
                "url": f"http://{meta['name']}.{meta.get('namespace', 'default')}.svc.cluster.local"
            },
        }
        if mode in ("standard", "rawdeployment"):
            status["deploymentMode"] = "Standard"
            return self._standard(service, spec, status, url)
        status["deploymentMode"] = "Serverless"
        tags = annotations.get("serving.kserve.io/enable-tag-routing") == "true"
        return self._serverless(service, meta["name"], spec, status, url, tags)

    def _serverless(self, service: _Service, name, spec, status, url, tags) -> dict:
        predictor = spec["predictor"]
        key = json.dumps(
            {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True
        )
        if not service.revisions or service.revisions[-1][1] != key:
            revision = f"{name}-predictor-{len(service.revisions) + 1:05d}"
            service.revisions.append((revision, key, self._readiness(service, predictor)))
        latest, _, ready = service.revisions[-1]
        latest_ready = next((r[0] for r in reversed(service.revisions) if r[2] is True), None)
        percent = predictor.get("canaryTrafficPercent")

        def target(revision, share, is_latest, tag):
            entry = {"revisionName": revision, "percent": share, "latestRevision": is_latest}
            if tags:
                entry.update(tag=tag, url=f"http://{tag}-{url.removeprefix('http://')}")
            return entry

        if ready is True:
            if service.rolled_out in (None, latest) or percent is None or percent >= 100:
                if service.rolled_out != latest:
                    service.previous, service.rolled_out = service.rolled_out, latest
                traffic = [target(latest, 100, True, "latest")]
            else:
                traffic = [
                    target(latest, percent, True, "latest"),
                    target(service.rolled_out, 100 - percent, False, "prev"),
                ]
            conditions = [_condition(k, True) for k in ("IngressReady", "PredictorReady", "Ready")]
        else:
            traffic = [target(service.rolled_out, 100, False, "prev")] if service.rolled_out else []
            message = f'Revision "{latest}" failed with message: {ready}.'
            conditions = [
                _condition(
                    "IngressReady",
                    bool(service.rolled_out),
                    "IngressNotConfigured",
                    "no ready revision",
                ),
                _condition("PredictorReady", False, "RevisionFailed", message),
                _condition("Ready", False, "RevisionFailed", message),
            ]
        predictor_status = {"latestCreatedRevision": latest, "traffic": traffic, "url": url}
        if latest_ready:
            predictor_status["latestReadyRevision"] = latest_ready
        if service.rolled_out:
            predictor_status["latestRolledoutRevision"] = service.rolled_out
        if service.previous:
            predictor_status["previousRolledoutRevision"] = service.previous
        return {**status, "components": {"predictor": predictor_status}, "conditions": conditions}

    def _standard(self, service: _Service, spec, status, url) -> dict:
        main = self._readiness(service, spec["predictor"])
        conditions = [
            _condition("PredictorReady", main is True, "MinimumReplicasUnavailable", str(main)),
            _condition("Ready", main is True, "MinimumReplicasUnavailable", str(main)),
        ]
        result = {**status, "components": {"predictor": {"url": url}}, "conditions": conditions}
        canaries = spec.get("canary") or []
        if canaries:
            statuses, problems = [], []
            for entry in canaries:
                ready = self._readiness(service, entry["predictor"])
                name = entry["predictor"].get("name", "")
                statuses.append(
                    {
                        "name": name,
                        "ready": ready is True,
                        "trafficPercent": entry.get("trafficPercent", 0),
                    }
                )
                if ready is not True:
                    problems.append(f"canary {name}: {ready}")
            result["canaryStatuses"] = statuses
            conditions.append(
                _condition(
                    "CanaryPredictorReady",
                    not problems,
                    "MinimumReplicasUnavailable",
                    "; ".join(problems),
                )
            )
        return result
