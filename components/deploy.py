"""deploy: roll a gated model version out as a KServe InferenceService, in either KServe mode.

First deployment: the version serves all traffic and becomes `champion` once Ready. Later
ones: the version runs as a canary at `canary_percent` beside the one serving now (Serverless:
a new revision with `canaryTrafficPercent`; Standard: a `spec.canary` entry) until an operator
promotes or rolls it back (`fineserve rollout`, or kubectl). A canary that is not ready in time is
rolled back and the step fails with the reason from the status conditions. Running the step
again with the same inputs changes nothing. The location KServe downloads the model from is
checked before anything is written.
"""

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from kfp.dsl import Markdown, Output

from fineserve.components.decorator import component

log = logging.getLogger(__name__)

CREATED = "created"
CANARY = "canary"
UNCHANGED = "unchanged"
SKIPPED = "skipped"


@dataclass
class Deployment:
    """What the deploy step did, and the rollout it left."""

    action: str
    message: str
    rollout: Any = None  # fineserve.core.inference_service.Rollout, when a cluster was used


def rollout_version(
    cluster,
    client,
    *,
    name: str,
    model_name: str,
    mode: str,
    settings,
    canary_percent: int,
    timeout: float,
    interval: float = 2.0,
) -> Deployment:
    """Deploy ``settings.model_version``: create, or start a canary, or find it already there."""
    from fineserve.core import inference_service as isvc_ops
    from fineserve.core import registry, rollout
    from fineserve.core.artifacts import CHAMPION
    from fineserve.core.errors import ClusterError

    version = str(settings.model_version)
    isvc_ops.check_percent(canary_percent)
    current = cluster.get(name)
    if current is None:
        body = isvc_ops.new_inference_service(name, cluster.namespace, mode, model_name, settings)
        cluster.create(body)
        ready, last, why = cluster.wait(name, _judge_first, timeout=timeout, interval=interval)
        if not ready:
            raise ClusterError(
                f"InferenceService {name!r} with v{version} was not Ready after {timeout:g}s "
                f"({why}); nothing served before it, so there is nothing to roll back to: "
                f"inspect it with `kubectl describe isvc {name} -n {cluster.namespace}`"
            )
        rollout.move_champion(
            client, model_name, version, registry.get_alias(client, model_name, CHAMPION)
        )
        return Deployment(CREATED, f"v{version} serves all traffic", isvc_ops.read_rollout(last))

    _check_same_owner(current, name, mode, model_name)
    state = isvc_ops.read_rollout(current)
    if state.canary is None and state.stable and state.stable.version == version:
        return Deployment(UNCHANGED, f"v{version} already serves all traffic", state)
    if state.canary is not None and state.canary.version == version:
        if state.canary.percent == 0:
            return Deployment(
                UNCHANGED,
                f"v{version} was rolled back on this InferenceService: not redeployed",
                state,
            )
        action, message = UNCHANGED, f"v{version} is already the canary"
    else:
        if state.canary is not None and state.canary.percent > 0:
            raise ClusterError(
                f"InferenceService {name!r} has canary v{state.canary.version} at "
                f"{state.canary.percent}% in flight: promote or roll it back first "
                f"(fineserve rollout promote|rollback {name})"
            )

        def start(isvc: dict) -> dict:
            now = isvc_ops.read_rollout(isvc)
            if now.canary is not None and now.canary.percent > 0:
                raise ClusterError(
                    f"InferenceService {name!r}: canary v{now.canary.version} was started "
                    "meanwhile by another writer; not replacing it"
                )
            return isvc_ops.start_canary(isvc, settings, canary_percent, now.served_version)

        cluster.change(name, start)
        action, message = CANARY, f"v{version} is the canary at {canary_percent}%"

    ready, last, why = cluster.wait(
        name, lambda obj: _judge_canary(obj, version), timeout=timeout, interval=interval
    )
    if not ready:
        _, after, _ = cluster.change(name, isvc_ops.roll_back_canary)
        stable = isvc_ops.read_rollout(after).stable
        raise ClusterError(
            f"canary v{version} of InferenceService {name!r} was not ready after {timeout:g}s "
            f"({why}); rolled back: all traffic on v{stable.version if stable else '?'}"
        )
    return Deployment(action, message, isvc_ops.read_rollout(last))


def _check_same_owner(current: dict, name: str, mode: str, model_name: str) -> None:
    from fineserve.core import inference_service as isvc_ops
    from fineserve.core.errors import ClusterError

    live_mode = isvc_ops.mode_of(current)
    if live_mode != mode:
        raise ClusterError(
            f"InferenceService {name!r} runs in {live_mode} mode, deployment_mode is {mode}: "
            "KServe cannot switch a live InferenceService's mode; use another name"
        )
    owner = (current["metadata"].get("annotations") or {}).get(isvc_ops.MODEL_ANNOTATION)
    if owner != model_name:
        raise ClusterError(
            f"InferenceService {name!r} serves {owner or 'a model fineserve did not deploy'}, "
            f"not {model_name!r}: use another inference_service name"
        )


def _judge_first(isvc: dict) -> tuple[bool, str]:
    from fineserve.core import inference_service as isvc_ops

    if not isvc_ops.observed_current(isvc):
        return False, "KServe's controller has not reconciled the spec yet"
    if isvc_ops.is_condition_true(isvc, "Ready"):
        return True, ""
    return False, isvc_ops.condition_message(isvc, "PredictorReady", "Ready") or "not Ready"


def _judge_canary(isvc: dict, version: str) -> tuple[bool, str]:
    from fineserve.core import inference_service as isvc_ops

    if not isvc_ops.observed_current(isvc):
        return False, "KServe's controller has not reconciled the spec yet"
    canary = isvc_ops.read_rollout(isvc).canary
    if canary is None or canary.version != version:
        return False, "the canary is no longer in the spec (changed by another writer?)"
    if canary.ready:
        return True, ""
    kinds = ("CanaryPredictorReady",) if isvc_ops.mode_of(isvc) == "Standard" else ()
    why = isvc_ops.condition_message(isvc, *kinds, "PredictorReady", "Ready")
    return False, why or "the canary is not ready yet"


def markdown_report(deployment: Deployment, name: str) -> str:
    """The deployment as Markdown (rendered in the Kubeflow UI)."""
    lines = [
        "# fineserve deploy",
        "",
        f"InferenceService `{name}`: **{deployment.action}**: {deployment.message}.",
    ]
    rollout = deployment.rollout
    if rollout is not None:
        lines += [
            "",
            "| track | name | version | traffic | ready |",
            "| --- | --- | --- | --- | --- |",
        ]
        for track in (rollout.stable, rollout.canary):
            if track is not None:
                lines.append(
                    f"| {track.role} | {track.name} | v{track.version} | {track.percent}% | "
                    f"{track.ready} |"
                )
    return "\n".join(lines) + "\n"


@component
def deploy(
    report: Output[Markdown],
    model_name: str,
    model_version: str,
    tracking_uri: str = "",
    inference_service: str = "fineserve",
    namespace: str = "",
    kube_context: str = "",
    deployment_mode: str = "Serverless",
    image: str = "",
    storage_service_account: str = "fineserve-storage",
    canary_percent: int = 10,
    min_replicas: int = 1,
    max_replicas: int = 4,
    scale_metric: str = "",
    scale_target: int = 0,
    container_concurrency: int = 0,
    predictor_cpu: str = "1",
    predictor_cpu_limit: str = "2",
    predictor_memory: str = "2Gi",
    predictor_memory_limit: str = "4Gi",
    predictor_gpus: int = 0,
    ready_timeout: int = 600,
) -> NamedTuple("DeployOutputs", [("action", str), ("message", str)]):
    """Roll the gated version out as a KServe InferenceService (first: 100%; then a canary).

    Args:
        model_name: Registered model name in the MLflow Model Registry.
        model_version: The version to roll out (the gate's challenger).
        tracking_uri: MLflow tracking URI; empty for MLFLOW_TRACKING_URI, else a local SQLite
            store.
        inference_service: Name of the InferenceService.
        namespace: Its namespace; empty for the pod's own (in a cluster) or the kube context's.
        kube_context: Kubeconfig context to deploy with; empty inside a cluster (the pod's
            ServiceAccount). A local run with none skips this step.
        deployment_mode: KServe mode: Serverless (Knative) or Standard (RawDeployment).
        image: Predictor image; empty for the image the pipeline was compiled with.
        storage_service_account: ServiceAccount whose credentials KServe's storage
            initializer uses to download the model; empty for the namespace default.
        canary_percent: Share of traffic (0-100) a new version gets beside the serving one.
        min_replicas: Fewest predictor replicas (0 scales to zero; Serverless mode only).
        max_replicas: Most predictor replicas.
        scale_metric: Autoscaling metric: concurrency, rps, cpu or memory (Serverless) or
            cpu, memory (Standard); empty for concurrency (Serverless) or cpu (Standard).
        scale_target: Target value of the metric per replica; 0 for 8 in-flight requests
            (concurrency) or 80% (cpu, memory).
        container_concurrency: Hard limit of requests in flight per replica (Serverless only);
            0 for none.
        predictor_cpu: CPU request of a predictor replica (a Kubernetes quantity).
        predictor_cpu_limit: CPU limit of a predictor replica.
        predictor_memory: Memory request of a predictor replica (a Kubernetes quantity).
        predictor_memory_limit: Memory limit of a predictor replica.
        predictor_gpus: NVIDIA GPUs per predictor replica (it then serves on CUDA).
        ready_timeout: Seconds to wait for the new version to be ready before rolling back.

    Returns:
        report: Output Markdown report of what was deployed (rendered in the Kubeflow UI).
        action: created, canary, unchanged or skipped.
        message: What happened, in a sentence.
    """
    from collections import namedtuple
    from pathlib import Path

    from fineserve.components import deploy as step
    from fineserve.core import inference_service as isvc_ops
    from fineserve.core import registry, storage
    from fineserve.core.cluster import Cluster, cluster_available
    from fineserve.core.defaults import component_image

    outputs = namedtuple("DeployOutputs", ["action", "message"])
    mode = isvc_ops.normalize_mode(deployment_mode)
    isvc_ops.check_percent(canary_percent)
    settings = isvc_ops.PredictorSettings(
        image=image or component_image(),
        storage_uri="",
        model_version=str(model_version),
        service_account=storage_service_account,
        cpu_request=predictor_cpu,
        cpu_limit=predictor_cpu_limit,
        memory_request=predictor_memory,
        memory_limit=predictor_memory_limit,
        gpus=predictor_gpus,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        scale_metric=scale_metric,
        scale_target=scale_target,
        container_concurrency=container_concurrency,
    )
    isvc_ops.check_settings(mode, settings)
    if not cluster_available(kube_context):
        deployment = step.Deployment(
            step.SKIPPED, "no cluster named (set kube_context to deploy from a local run)"
        )
    else:
        client = registry.mlflow_client(tracking_uri)
        settings.storage_uri = storage.check_storage_uri(
            registry.model_dir_uri(client, model_name, model_version)
        )
        deployment = step.rollout_version(
            Cluster(context=kube_context, namespace=namespace),
            client,
            name=inference_service,
            model_name=model_name,
            mode=mode,
            settings=settings,
            canary_percent=canary_percent,
            timeout=ready_timeout,
            interval=min(2.0, max(0.05, ready_timeout / 50)),
        )
    step.log.info("deploy %s: %s", deployment.action, deployment.message)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(step.markdown_report(deployment, inference_service))
    return outputs(deployment.action, deployment.message)
