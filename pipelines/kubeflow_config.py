"""The `kubeflow:` section of a params file: where and how the pipeline runs on a cluster.

One file holds both: its top-level keys are pipeline parameters (as for `run --local`), and
its `kubeflow:` mapping says which KFP to submit to and how every step's pod is set up
(kfp-kubernetes): Secrets as environment variables, a cache volume (Hugging Face cache and
train checkpoints, so a retried train step resumes), GPU node selector and tolerations,
per-step timeouts and retries, image pull secrets, the run's ServiceAccount.

    kubeflow:
      host: https://kubeflow.example.com/pipeline
      namespace: team-ml
      experiment: fineserve
      image: registry.example.com/fineserve:1.2.0
      service_account: fineserve-pipeline
      image_pull_secrets: [regcred]
      secrets:
        - {name: fineserve-s3, keys: {AWS_ACCESS_KEY_ID: AWS_ACCESS_KEY_ID,
                                       AWS_SECRET_ACCESS_KEY: AWS_SECRET_ACCESS_KEY}}
        - {name: hf-token, keys: {token: HF_TOKEN}, steps: [download, train], optional: true}
      cache_pvc: fineserve-cache
      gpu_node_selector: {nvidia.com/gpu.present: "true"}
      gpu_tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      timeouts: {train: 6h, download: 30m}
      retries: {train: 2}
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from fineserve.core.errors import ParameterError, shown
from fineserve.pipelines import cluster_names as names

SECTION = "kubeflow"
#: The DAG's tasks, as `timeouts`, `retries` and a secret's `steps` name them.
STEP_NAMES = (
    "download", "tokenize", "train", "evaluate", "register", "gate", "deploy", "analyze-canary",
)  # fmt: skip
#: Steps that read the Hugging Face Hub (and its cache): the cache volume's HF_HOME.
HUB_STEPS = ("download", "tokenize", "train")
CACHE_MOUNT = "/cache"
TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SecretEnv:
    """A Secret whose keys become environment variables of some steps (all by default)."""

    name: str
    keys: dict[str, str]  # secret key -> environment variable
    steps: tuple[str, ...] = STEP_NAMES
    optional: bool = False


@dataclass(frozen=True)
class KubeflowConfig:
    """Where the pipeline is submitted and how its pods are set up."""

    host: str = ""
    namespace: str = ""
    experiment: str = "fineserve"
    image: str = ""
    service_account: str = ""
    image_pull_secrets: tuple[str, ...] = ()
    secrets: tuple[SecretEnv, ...] = ()
    cache_pvc: str = ""
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[dict, ...] = ()
    timeouts: dict[str, int] = field(default_factory=dict)  # step -> seconds
    retries: dict[str, int] = field(default_factory=dict)  # step -> retries


def _where(key: str) -> str:
    return f"{SECTION}.{key}"


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"{_where(key)} must be a string, got {value!r}")
    return value


def _k8s_name(
    key: str, value: Any, check: Callable[[str], str | None] = names.dns1123_subdomain_problem
) -> str:
    value = _string(key, value)
    problem = check(value)
    if problem:
        raise ParameterError(f"{_where(key)} {problem}, got {shown(value)}")
    return value


def _list(key: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ParameterError(f"{_where(key)} must be a list, got {value!r}")
    return value


def _mapping(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ParameterError(f"{_where(key)} must be a mapping, got {value!r}")
    return value


def _step(key: str, value: Any) -> str:
    if value not in STEP_NAMES:
        raise ParameterError(
            f"{_where(key)}: unknown step {value!r}; steps: {', '.join(STEP_NAMES)}"
        )
    return value


def duration_seconds(key: str, value: Any) -> int:
    """Seconds of ``value``: an integer of seconds or a string such as 90s, 30m, 6h, 1d."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _DURATION.match(str(value).strip()) if isinstance(value, str) else None
    if not match or int(match.group(1)) <= 0:
        raise ParameterError(
            f"{_where(key)} must be a positive duration (seconds, or e.g. 30m, 6h), got {value!r}"
        )
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _secret(index: int, item: Any) -> SecretEnv:
    key = f"secrets[{index}]"
    item = _mapping(key, item)
    unknown = set(item) - {"name", "keys", "steps", "optional"}
    if unknown:
        raise ParameterError(
            f"{_where(key)}: unknown keys {sorted(unknown)} (known: name, keys, steps, optional)"
        )
    if "name" not in item or "keys" not in item:
        raise ParameterError(f"{_where(key)} needs `name` and `keys` (secret key: ENV_VAR)")
    keys = _mapping(f"{key}.keys", item["keys"])
    if not keys:
        raise ParameterError(f"{_where(key + '.keys')} is empty")
    for secret_key, env in keys.items():
        if not _ENV_NAME.match(str(env)):
            raise ParameterError(
                f"{_where(key + '.keys')}: {env!r} (for key {secret_key!r}) is not an "
                "environment variable name"
            )
    steps = tuple(
        _step(f"{key}.steps", s) for s in _list(f"{key}.steps", item.get("steps", list(STEP_NAMES)))
    )
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise ParameterError(f"{_where(key + '.optional')} must be true or false")
    return SecretEnv(
        _k8s_name(f"{key}.name", item["name"]),
        {str(k): str(v) for k, v in keys.items()},
        steps,
        optional,
    )


def _toleration(index: int, item: Any) -> dict:
    key = f"gpu_tolerations[{index}]"
    item = _mapping(key, item)
    unknown = set(item) - TOLERATION_KEYS
    if unknown:
        raise ParameterError(
            f"{_where(key)}: unknown keys {sorted(unknown)} (known: {sorted(TOLERATION_KEYS)})"
        )
    if item.get("operator", "Equal") not in ("Equal", "Exists"):
        raise ParameterError(f"{_where(key + '.operator')} must be Equal or Exists")
    effect = item.get("effect")
    if effect not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ParameterError(
            f"{_where(key + '.effect')} must be NoSchedule, PreferNoSchedule or NoExecute"
        )
    return dict(item)


def parse(section: Any) -> KubeflowConfig:
    """The `kubeflow:` mapping as a KubeflowConfig; a ParameterError naming a bad key."""
    if section is None:
        return KubeflowConfig()
    if not isinstance(section, dict):
        raise ParameterError(f"{SECTION} must be a mapping of settings, got {section!r}")
    known = {f.name for f in fields(KubeflowConfig)}
    unknown = set(section) - known
    if unknown:
        raise ParameterError(
            f"unknown keys {sorted(f'{SECTION}.{k}' for k in unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    values: dict[str, Any] = {}
    for name in ("host", "image", "experiment"):
        if name in section:
            values[name] = _string(name, section[name])
    if "namespace" in section:
        values["namespace"] = _k8s_name(
            "namespace", section["namespace"], names.dns1123_label_problem
        )
    for name in ("service_account", "cache_pvc"):
        if name in section:
            values[name] = _k8s_name(name, section[name])
    if "image_pull_secrets" in section:
        values["image_pull_secrets"] = tuple(
            _k8s_name("image_pull_secrets", s)
            for s in _list("image_pull_secrets", section["image_pull_secrets"])
        )
    if "secrets" in section:
        values["secrets"] = tuple(
            _secret(i, s) for i, s in enumerate(_list("secrets", section["secrets"]))
        )
    if "gpu_node_selector" in section:
        selector = _mapping("gpu_node_selector", section["gpu_node_selector"])
        values["gpu_node_selector"] = {
            str(k): _string(f"gpu_node_selector.{k}", v) for k, v in selector.items()
        }
    if "gpu_tolerations" in section:
        values["gpu_tolerations"] = tuple(
            _toleration(i, t)
            for i, t in enumerate(_list("gpu_tolerations", section["gpu_tolerations"]))
        )
    if "timeouts" in section:
        values["timeouts"] = {
            _step("timeouts", step): duration_seconds(f"timeouts.{step}", value)
            for step, value in _mapping("timeouts", section["timeouts"]).items()
        }
    if "retries" in section:
        retries = {}
        for step, value in _mapping("retries", section["retries"]).items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10:
                raise ParameterError(f"{_where(f'retries.{step}')} must be 0-10, got {value!r}")
            retries[_step("retries", step)] = value
        values["retries"] = retries
    return KubeflowConfig(**values)


def split_params(loaded: dict[str, Any]) -> tuple[dict[str, Any], KubeflowConfig]:
    """A params file's pipeline parameters, and its `kubeflow:` section parsed."""
    params = {k: v for k, v in loaded.items() if k != SECTION}
    return params, parse(loaded.get(SECTION))


def apply(tasks: dict[str, Any], config: KubeflowConfig) -> None:
    """Set every task's pod up as ``config`` says (kfp-kubernetes platform config)."""
    from kfp import kubernetes

    for name, task in tasks.items():
        for secret in config.secrets:
            if name in secret.steps:
                kubernetes.use_secret_as_env(
                    task, secret.name, secret.keys, optional=secret.optional
                )
        if config.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(config.image_pull_secrets))
        if config.cache_pvc and name in HUB_STEPS:
            kubernetes.mount_pvc(task, config.cache_pvc, CACHE_MOUNT)
            task.set_env_variable("HF_HOME", f"{CACHE_MOUNT}/huggingface")
        if name in config.timeouts:
            kubernetes.set_timeout(task, config.timeouts[name])
        if name in config.retries:
            task.set_retry(num_retries=config.retries[name], backoff_duration="30s")
    train = tasks["train"]
    for label, value in config.gpu_node_selector.items():
        kubernetes.add_node_selector(train, label, value)
    for toleration in config.gpu_tolerations:
        kubernetes.add_toleration(train, **toleration)
