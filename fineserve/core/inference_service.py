"""The fineserve InferenceService in both KServe modes: built, read back, and changed.

Serverless (Knative) mode: one predictor spec; a change creates a revision, and
`canaryTrafficPercent` splits traffic between it and the last rolled-out revision. Promote by
removing the field; roll back with 0. Standard mode (RawDeployment) ignores that field; there a
canary is an entry of `spec.canary` with its own named predictor. Promote by making the canary's
predictor the main one; roll back by dropping the entry.

Every predictor carries its MLflow version in the label `fineserve.io/model-version` (so every
revision, canary and pod maps back to a version), and the InferenceService names its registered
model and, in Serverless mode, the version serving beside a canary in annotations.

KServe copies the InferenceService's labels and annotations (but a short disallow list) into
every predictor's pod template and Knative revision template (KServe's
pkg/controller/v1beta1/inferenceservice/components/predictor.go, buildObjectMeta): a change to
them alone restarts the model. So the ones set here change only together with a predictor
spec, and what changes on its own during a rollout lives elsewhere (the canary analysis' lease
is a `coordination.k8s.io` Lease, fineserve.core.lease).

The functions here work on plain dicts (what the API returns); objects sent to the API are built
with the kserve SDK's models.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from fineserve.core.errors import ClusterError, ParameterError

GROUP = "serving.kserve.io"
API_VERSION = "v1beta1"
PLURAL = "inferenceservices"
KIND = "InferenceService"

SERVERLESS = "Serverless"
STANDARD = "Standard"
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"
#: KServe's names for the modes, old and new (0.17 renamed RawDeployment to Standard and
#: Serverless to Knative; the controller accepts both).
_MODE_NAMES = {
    "serverless": SERVERLESS,
    "knative": SERVERLESS,
    "standard": STANDARD,
    "rawdeployment": STANDARD,
}
VERSION_LABEL = "fineserve.io/model-version"
MODEL_ANNOTATION = "fineserve.io/registered-model"
#: Serverless mode: the version of the revision a canary runs beside (the last rolled out).
#: Written only in the write that starts a canary, never on its own: KServe copies the
#: InferenceService's annotations into the Knative revision template (and the Deployments' pod
#: templates; components/predictor.go, buildPredictorResources), so a change of it alone would
#: make a revision. Read only while `canaryTrafficPercent` is below 100.
STABLE_ANNOTATION = "fineserve.io/stable-version"
CONTAINER_NAME = "kserve-container"  # KServe reads STORAGE_URI only from this container

SERVERLESS_SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")
STANDARD_SCALE_METRICS = ("cpu", "memory")
#: Serverless scaling on cpu or memory is Knative's HPA class: under the default class (KPA)
#: KServe's validator allows only concurrency and rps (pkg/apis/serving/v1beta1/
#: inference_service_validation.go, validateAutoScalingCompExtension), and Knative's too
#: (knative.dev/serving pkg/apis/autoscaling/annotation_validation.go, validateMetric).
AUTOSCALER_CLASS_ANNOTATION = "autoscaling.knative.dev/class"
HPA_CLASS = "hpa.autoscaling.knative.dev"
HPA_METRICS = ("cpu", "memory")
#: The target when none is given: in-flight requests or requests per second per replica, or
#: % of the request (cpu; memory in Standard mode, where KServe's HPA takes it as utilization:
#: reconcilers/hpa/hpa_reconciler.go). Serverless memory has none (MiB per replica there).
DEFAULT_TARGETS = {"concurrency": 8, "rps": 8, "cpu": 80, "memory": 80}


def normalize_mode(mode: str) -> str:
    """`Serverless` or `Standard` for any of KServe's names of a mode; else a ParameterError."""
    try:
        return _MODE_NAMES[mode.strip().lower()]
    except KeyError:
        raise ParameterError(
            f"deployment_mode {mode!r} is not a KServe mode: use Serverless (Knative) or "
            "Standard (RawDeployment)"
        ) from None


def mode_of(isvc: dict) -> str:
    """The deployment mode of an InferenceService (KServe's default, Serverless, if unset)."""
    annotations = isvc.get("metadata", {}).get("annotations") or {}
    return normalize_mode(annotations.get(MODE_ANNOTATION, SERVERLESS))


#: Where Prometheus (annotation-based pod discovery) finds each predictor's /metrics: the canary
#: analysis reads them.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "8080",
    "prometheus.io/path": "/metrics",
}


@dataclass
class PredictorSettings:
    """What a predictor runs and how it scales; 0 or "" means the mode's default."""

    image: str
    storage_uri: str
    model_version: str
    service_account: str = ""
    served_model_name: str = "fineserve"
    cpu_request: str = "1"
    memory_request: str = "2Gi"
    cpu_limit: str = "2"
    memory_limit: str = "4Gi"
    gpus: int = 0
    min_replicas: int = 1
    max_replicas: int = 4
    scale_metric: str = ""
    scale_target: int = 0
    container_concurrency: int = 0
    extra_args: list[str] = field(default_factory=list)


def check_settings(mode: str, settings: PredictorSettings) -> None:
    """Refuse settings the mode ignores or rejects, naming each and why."""
    problems = []
    if settings.min_replicas < 0 or settings.max_replicas < 1:
        problems.append("min_replicas must be >= 0 and max_replicas >= 1")
    if settings.max_replicas < settings.min_replicas:
        problems.append(
            f"max_replicas ({settings.max_replicas}) is below min_replicas "
            f"({settings.min_replicas})"
        )
    if settings.scale_target < 0 or settings.container_concurrency < 0 or settings.gpus < 0:
        problems.append("scale_target, container_concurrency and gpus cannot be negative")
    problems += _quantity_problems(settings)
    metric = settings.scale_metric
    if mode == STANDARD:
        if metric and metric not in STANDARD_SCALE_METRICS:
            problems.append(
                f"scale_metric {metric!r}: Standard mode scales with the HPA on cpu or memory "
                "only (use Serverless mode for concurrency or rps)"
            )
        if settings.min_replicas == 0:
            problems.append("min_replicas 0: Standard mode cannot scale to zero (use >= 1)")
        if settings.container_concurrency:
            problems.append(
                "container_concurrency: a Knative setting, ignored in Standard mode (leave it 0)"
            )
    elif metric and metric not in SERVERLESS_SCALE_METRICS:
        problems.append(
            f"scale_metric {metric!r}: use one of {', '.join(SERVERLESS_SCALE_METRICS)}"
        )
    elif metric in HPA_METRICS:
        problems += _knative_hpa_problems(metric, settings.scale_target)
    if problems:
        raise ParameterError(f"{mode} mode: " + "; ".join(problems))


def _knative_hpa_problems(metric: str, target: int) -> list[str]:
    """Serverless targets on cpu or memory that KServe's webhook would refuse, or that mislead.

    Under Knative's HPA class KServe refuses a target above 100 for either metric
    (validateScalingHPACompExtension); Knative's HPA reads a memory target as MiB per replica
    (knative.dev/serving pkg/reconciler/autoscaling/hpa/resources/hpa.go), so a default of
    80 would not mean 80%.
    """
    unit = "% of the CPU request" if metric == "cpu" else "MiB per replica"
    if target > 100:
        return [
            f"scale_target {target} with scale_metric {metric!r}: KServe allows 1-100 on "
            f"Knative's HPA ({unit})"
        ]
    if metric == "memory" and not target:
        return [
            "scale_metric 'memory' needs a scale_target in Serverless mode: the MiB per "
            "replica Knative's HPA aims at (1-100; or scale on cpu)"
        ]
    return []


def _quantity_problems(settings: PredictorSettings) -> list[str]:
    from kubernetes.utils import parse_quantity

    problems = []
    pairs = {"cpu": (settings.cpu_request, settings.cpu_limit)}
    pairs["memory"] = (settings.memory_request, settings.memory_limit)
    for resource, (request, limit) in pairs.items():
        try:
            if parse_quantity(request) > parse_quantity(limit):
                problems.append(f"{resource} request {request} is above its limit {limit}")
        except ValueError:
            problems.append(
                f"{resource} request {request!r} or limit {limit!r} is not a Kubernetes "
                "quantity (e.g. 500m, 2, 512Mi, 4Gi)"
            )
    return problems


def scale_of(mode: str, settings: PredictorSettings) -> tuple[str, int]:
    """The metric and target a predictor scales on: the settings', else the mode's default."""
    metric = settings.scale_metric or ("concurrency" if mode == SERVERLESS else "cpu")
    return metric, settings.scale_target or DEFAULT_TARGETS[metric]


def set_autoscaler_class(annotations: dict, mode: str, settings: PredictorSettings) -> None:
    """Knative's HPA class in ``annotations`` for a Serverless predictor on cpu or memory.

    Otherwise the class fineserve set is taken out (KServe's default, KPA, applies); a class a
    person set for another metric stays.
    """
    if mode == SERVERLESS and scale_of(mode, settings)[0] in HPA_METRICS:
        annotations[AUTOSCALER_CLASS_ANNOTATION] = HPA_CLASS
    elif annotations.get(AUTOSCALER_CLASS_ANNOTATION) == HPA_CLASS:
        del annotations[AUTOSCALER_CLASS_ANNOTATION]


def predictor_spec(mode: str, settings: PredictorSettings, *, name: str | None = None) -> Any:
    """The predictor of a version as a kserve SDK `V1beta1PredictorSpec`."""
    from kserve import V1beta1PredictorSpec
    from kubernetes.client import (
        V1Capabilities,
        V1Container,
        V1ContainerPort,
        V1EnvVar,
        V1HTTPGetAction,
        V1Probe,
        V1ResourceRequirements,
        V1SeccompProfile,
        V1SecurityContext,
    )

    check_settings(mode, settings)
    metric, target = scale_of(mode, settings)
    limits = {"cpu": settings.cpu_limit, "memory": settings.memory_limit}
    if settings.gpus:
        limits["nvidia.com/gpu"] = str(settings.gpus)
    container = V1Container(
        name=CONTAINER_NAME,
        image=settings.image,
        args=[
            f"--model_name={settings.served_model_name}",
            "--model_dir=/mnt/models",
            *(["--device=cuda"] if settings.gpus else []),
            *settings.extra_args,
        ],
        env=[
            V1EnvVar(name="STORAGE_URI", value=settings.storage_uri),
            # the version the predictor answers as (v2 metadata, /metrics): the canary analysis
            # tells revisions apart by it
            V1EnvVar(name="FINESERVE_MODEL_VERSION", value=str(settings.model_version)),
        ],
        ports=[V1ContainerPort(container_port=8080, protocol="TCP")],
        readiness_probe=V1Probe(
            http_get=V1HTTPGetAction(path="/v2/health/ready", port=8080),
            period_seconds=5,
            timeout_seconds=3,
            failure_threshold=3,
        ),
        resources=V1ResourceRequirements(
            requests={"cpu": settings.cpu_request, "memory": settings.memory_request},
            limits=limits,
        ),
        security_context=V1SecurityContext(
            run_as_non_root=True,
            allow_privilege_escalation=False,
            capabilities=V1Capabilities(drop=["ALL"]),
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    return V1beta1PredictorSpec(
        name=name,
        labels={VERSION_LABEL: str(settings.model_version)},
        annotations=dict(SCRAPE_ANNOTATIONS),
        service_account_name=settings.service_account or None,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        scale_metric=metric,
        scale_target=target,
        container_concurrency=settings.container_concurrency or None,
        containers=[container],
    )


def standard_predictor_name(version: str) -> str:
    """The predictor name of a version in Standard mode (its Deployment and Service)."""
    return f"predictor-v{version}"


def to_dict(model: Any) -> dict:
    """A kserve/kubernetes SDK model as the JSON the API takes."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(model)


def new_inference_service(
    name: str, namespace: str, mode: str, model_name: str, settings: PredictorSettings
) -> dict:
    """A first InferenceService serving ``settings``' version with all traffic."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec
    from kubernetes.client import V1ObjectMeta

    annotations = {MODE_ANNOTATION: mode, MODEL_ANNOTATION: model_name}
    if mode == SERVERLESS:
        annotations[TAG_ROUTING_ANNOTATION] = "true"
    set_autoscaler_class(annotations, mode, settings)
    predictor_name = standard_predictor_name(settings.model_version) if mode == STANDARD else None
    isvc = V1beta1InferenceService(
        api_version=f"{GROUP}/{API_VERSION}",
        kind=KIND,
        metadata=V1ObjectMeta(
            name=name,
            namespace=namespace,
            annotations=annotations,
            labels={"app.kubernetes.io/part-of": "fineserve"},
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=predictor_spec(mode, settings, name=predictor_name)
        ),
    )
    return to_dict(isvc)


# --------------------------------------------------------------------------- reading


@dataclass
class Track:
    """One side of a rollout: the stable predictor or the canary."""

    role: str  # "stable" or "canary"
    name: str  # Serverless: the revision; Standard: the predictor name
    version: str | None
    percent: int
    ready: bool | None  # None: not reported yet


@dataclass
class Rollout:
    """What an InferenceService serves now, read from its spec and status."""

    name: str
    namespace: str
    mode: str
    model_name: str | None
    stable: Track | None
    canary: Track | None
    ready: bool
    message: str
    url: str | None = None

    @property
    def served_version(self) -> str | None:
        """The version that gets all traffic, or None while a canary gets a share."""
        if self.canary is not None and self.canary.percent > 0:
            return None
        return self.stable.version if self.stable else None

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {**asdict(self), "served_version": self.served_version}


def _condition(isvc: dict, kind: str) -> dict | None:
    for condition in isvc.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def condition_message(isvc: dict, *kinds: str) -> str:
    """The reason and message of the first of ``kinds`` that is not True (or "")."""
    for kind in kinds:
        condition = _condition(isvc, kind)
        if condition and condition.get("status") != "True":
            reason, message = condition.get("reason", ""), condition.get("message", "")
            return f"{kind} is {condition.get('status')}: " + ": ".join(
                part for part in (reason, message) if part
            )
    return ""


def is_condition_true(isvc: dict, kind: str) -> bool:
    """Whether the condition ``kind`` is True."""
    condition = _condition(isvc, kind)
    return bool(condition and condition.get("status") == "True")


def observed_current(isvc: dict) -> bool:
    """Whether the controller has seen the object's latest spec."""
    generation = isvc.get("metadata", {}).get("generation")
    observed = isvc.get("status", {}).get("observedGeneration")
    return generation is None or (observed is not None and observed >= generation)


def _version(predictor: dict) -> str | None:
    return (predictor.get("labels") or {}).get(VERSION_LABEL)


def canary_percent(isvc: dict) -> int | None:
    """The canary's share of traffic asked for in the spec; None when no canary is in flight.

    Serverless: `canaryTrafficPercent` (100 counts as promoted) while the spec's version differs
    from the stable one. Standard: the first `spec.canary` entry's `trafficPercent`.
    """
    spec = isvc.get("spec", {})
    if mode_of(isvc) == STANDARD:
        canaries = spec.get("canary") or []
        return int(canaries[0].get("trafficPercent", 0)) if canaries else None
    percent = spec.get("predictor", {}).get("canaryTrafficPercent")
    stable = (isvc["metadata"].get("annotations") or {}).get(STABLE_ANNOTATION)
    if percent is None or percent >= 100 or stable is None:
        return None
    if stable == _version(spec.get("predictor", {})):
        return None
    return int(percent)


def read_rollout(isvc: dict) -> Rollout:
    """The stable and canary tracks of an InferenceService, with versions, traffic, readiness."""
    metadata, spec, status = isvc["metadata"], isvc.get("spec", {}), isvc.get("status") or {}
    mode = mode_of(isvc)
    annotations = metadata.get("annotations") or {}
    percent = canary_percent(isvc)
    if mode == STANDARD:
        stable, canary = _standard_tracks(spec, status, percent)
        message = condition_message(isvc, "PredictorReady", "CanaryPredictorReady", "Ready")
    else:
        stable, canary = _serverless_tracks(spec, status, annotations, percent)
        message = condition_message(isvc, "PredictorReady", "Ready")
    return Rollout(
        name=metadata["name"],
        namespace=metadata.get("namespace", ""),
        mode=mode,
        model_name=annotations.get(MODEL_ANNOTATION),
        stable=stable,
        canary=canary,
        ready=is_condition_true(isvc, "Ready"),
        message=message,
        url=status.get("url"),
    )


def _standard_tracks(spec: dict, status: dict, percent: int | None) -> tuple[Track, Track | None]:
    predictor = spec.get("predictor", {})
    canary = None
    if percent is not None:
        entry = spec["canary"][0]["predictor"]
        reported = {c.get("name"): c for c in status.get("canaryStatuses") or []}
        canary_status = reported.get(entry.get("name"))
        canary = Track(
            "canary",
            entry.get("name", ""),
            _version(entry),
            percent,
            canary_status.get("ready") if canary_status else None,
        )
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("PredictorReady")
    stable = Track(
        "stable",
        predictor.get("name") or "predictor",
        _version(predictor),
        100 - (percent or 0),
        None if ready is None else ready == "True",
    )
    return stable, canary


def _serverless_tracks(
    spec: dict, status: dict, annotations: dict, percent: int | None
) -> tuple[Track | None, Track | None]:
    predictor_status = (status.get("components") or {}).get("predictor") or {}
    traffic = predictor_status.get("traffic") or []
    latest_ready = predictor_status.get("latestReadyRevision")
    latest_created = predictor_status.get("latestCreatedRevision")
    spec_version = _version(spec.get("predictor", {}))
    if percent is None:
        target = next((t for t in traffic if t.get("percent")), None)
        name = (target or {}).get("revisionName") or latest_ready or ""
        stable = Track("stable", name, spec_version, 100, bool(latest_ready) or None)
        return stable, None
    previous = next((t for t in traffic if not t.get("latestRevision")), None)
    stable = Track(
        "stable",
        (previous or {}).get("revisionName") or predictor_status.get("latestRolledoutRevision", ""),
        annotations.get(STABLE_ANNOTATION),
        100 - percent,
        True if previous else None,
    )
    canary = Track(
        "canary",
        latest_created or "",
        spec_version,
        percent,
        (latest_created == latest_ready) if latest_created else None,
    )
    return stable, canary


# --------------------------------------------------------------------------- changing


def start_canary(
    isvc: dict, settings: PredictorSettings, percent: int, serving_version: str | None
) -> dict:
    """``isvc`` changed to run ``settings``' version as a canary at ``percent``."""
    check_percent(percent)
    changed = copy.deepcopy(isvc)
    mode = mode_of(changed)
    if mode == STANDARD:
        name = standard_predictor_name(settings.model_version)
        predictor = to_dict(predictor_spec(mode, settings, name=name))
        changed["spec"]["canary"] = [{"predictor": predictor, "trafficPercent": percent}]
    else:
        predictor = to_dict(predictor_spec(mode, settings))
        predictor["canaryTrafficPercent"] = percent
        changed["spec"]["predictor"] = predictor
        annotations = changed["metadata"].setdefault("annotations", {})
        annotations[TAG_ROUTING_ANNOTATION] = "true"
        set_autoscaler_class(annotations, mode, settings)
        if serving_version is not None:
            annotations[STABLE_ANNOTATION] = serving_version
    return changed


def check_percent(percent: int) -> None:
    """A traffic share must be a whole number from 0 to 100."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ParameterError(f"traffic percent {percent!r} must be a whole number from 0 to 100")


def _require_canary(isvc: dict, action: str) -> int:
    percent = canary_percent(isvc)
    if percent is None:
        raise ClusterError(
            f"InferenceService {isvc['metadata']['name']!r}: no canary in flight, nothing to "
            f"{action}"
        )
    return percent


def set_canary_traffic(isvc: dict, percent: int) -> dict:
    """``isvc`` with its canary at ``percent`` of traffic (the stable gets the rest)."""
    check_percent(percent)
    _require_canary(isvc, "shift")
    changed = copy.deepcopy(isvc)
    if mode_of(changed) == STANDARD:
        changed["spec"]["canary"][0]["trafficPercent"] = percent
    else:
        changed["spec"]["predictor"]["canaryTrafficPercent"] = percent
    return changed


def promote_canary(isvc: dict) -> dict:
    """``isvc`` with its canary serving all traffic as the new stable predictor."""
    _require_canary(isvc, "promote")
    changed = copy.deepcopy(isvc)
    spec = changed["spec"]
    if mode_of(changed) == STANDARD:
        spec["predictor"] = spec.pop("canary")[0]["predictor"]
    else:  # traffic only: the revision template stays, so does STABLE_ANNOTATION
        spec["predictor"].pop("canaryTrafficPercent", None)
    return changed


def roll_back_canary(isvc: dict) -> dict:
    """``isvc`` with all traffic back on the stable predictor and the canary out."""
    percent = _require_canary(isvc, "roll back")
    changed = copy.deepcopy(isvc)
    if mode_of(changed) == STANDARD:
        changed["spec"].pop("canary")
    else:
        if percent == 0:
            raise ClusterError(
                f"InferenceService {isvc['metadata']['name']!r}: the canary already gets 0% "
                "of traffic; nothing to roll back"
            )
        changed["spec"]["predictor"]["canaryTrafficPercent"] = 0
    return changed
