"""Rollout operations that keep the cluster and the MLflow registry in step.

`promote` makes the canary serve everything and moves the aliases: its version becomes
`champion`, the version it replaces `previous`. `rollback` and `set_traffic` change traffic only;
`champion` stays. Everything is checked before anything is written, and a registry write that
fails after the cluster changed puts the cluster back, so a failed command changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fineserve.core import registry
from fineserve.core.artifacts import CHALLENGER, CHAMPION, PREVIOUS
from fineserve.core.errors import ClusterError, RegistryError
from fineserve.core.inference_service import (
    Rollout,
    promote_canary,
    read_rollout,
    roll_back_canary,
    set_canary_traffic,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fineserve.core.cluster import Cluster

log = logging.getLogger(__name__)


@dataclass
class Status:
    """A rollout as the cluster reports it, the registry's aliases, and where they disagree."""

    rollout: Rollout
    aliases: dict[str, str | None]
    disagreement: str

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {
            **self.rollout.as_dict(),
            "aliases": self.aliases,
            "disagreement": self.disagreement,
        }


def aliases_of(client: MlflowClient, model_name: str) -> dict[str, str | None]:
    """The fineserve aliases of ``model_name`` and the versions they point to."""
    return {
        alias: registry.get_alias(client, model_name, alias)
        for alias in (CHAMPION, PREVIOUS, CHALLENGER)
    }


def disagreement(rollout: Rollout, aliases: dict[str, str | None]) -> str:
    """Why `champion` is not the version serving all traffic ("" when they agree)."""
    served = rollout.served_version
    if served is None or aliases.get(CHAMPION) == served:
        return ""
    return (
        f"the cluster serves v{served} to all traffic but MLflow's champion is "
        f"{'v' + aliases[CHAMPION] if aliases.get(CHAMPION) else 'unset'} (promoted with "
        "kubectl?); the next gate compares against v" + served
    )


def status(cluster: Cluster, name: str, client: MlflowClient | None) -> Status:
    """The rollout of ``name``, with the registry's view when ``client`` is given."""
    from mlflow.exceptions import MlflowException

    rollout = read_rollout(cluster.require(name))
    if client is None or rollout.model_name is None:
        return Status(rollout, {}, "")
    try:
        aliases = aliases_of(client, rollout.model_name)
    except MlflowException as err:
        return Status(rollout, {}, f"the registry could not be read: {err.message}")
    return Status(rollout, aliases, disagreement(rollout, aliases))


def render(status: Status) -> str:
    """A rollout as the table `fineserve rollout status` prints."""
    rollout = status.rollout
    readiness = "Ready" if rollout.ready else f"not Ready ({rollout.message or 'no status yet'})"
    lines = [
        f"InferenceService {rollout.name} (namespace {rollout.namespace}, {rollout.mode} mode, "
        f"model {rollout.model_name or '?'}): {readiness}",
        f"{'ROLE':<8}{'NAME':<36}{'VERSION':<9}{'TRAFFIC':<9}READY",
    ]
    for track in (rollout.stable, rollout.canary):
        if track is not None:
            ready = "-" if track.ready is None else str(track.ready)
            lines.append(
                f"{track.role:<8}{track.name or '-':<36}{'v' + (track.version or '?'):<9}"
                f"{str(track.percent) + '%':<9}{ready}"
            )
    if status.aliases:
        lines.append(
            "MLflow aliases: "
            + ", ".join(f"{a} {'v' + v if v else '-'}" for a, v in status.aliases.items())
        )
    if status.disagreement:
        lines.append(f"WARNING: {status.disagreement}")
    return "\n".join(lines)


def set_traffic(cluster: Cluster, name: str, percent: int) -> Rollout:
    """Give the canary of ``name`` ``percent`` of traffic."""
    _, after, _ = cluster.change(name, lambda isvc: set_canary_traffic(isvc, percent))
    return read_rollout(after)


def rollback(cluster: Cluster, name: str) -> Rollout:
    """Send all traffic of ``name`` back to its stable predictor; `champion` stays."""
    _, after, _ = cluster.change(name, roll_back_canary)
    return read_rollout(after)


def promote(cluster: Cluster, name: str, client: MlflowClient) -> Rollout:
    """Make the canary of ``name`` serve everything; its version becomes `champion`."""
    current = read_rollout(cluster.require(name))
    if current.canary is None:
        raise ClusterError(f"InferenceService {name!r}: no canary in flight, nothing to promote")
    model_name = _model_name(current)
    new, old = current.canary.version, current.stable.version if current.stable else None
    for version in (new, old):
        if version is not None:
            _check_version(client, model_name, version)
    before, after, _ = cluster.change(name, promote_canary)
    try:
        move_champion(client, model_name, new, old)
    except Exception:
        cluster.change(name, lambda isvc: _restore(isvc, before))
        raise
    return read_rollout(after)


def move_champion(client: MlflowClient, model_name: str, new: str, old: str | None) -> None:
    """`champion` → ``new``; `previous` → ``old`` (the version it replaces), if any."""
    if old is not None and old != new:
        registry.set_alias(client, model_name, PREVIOUS, old)
    registry.set_alias(client, model_name, CHAMPION, new)
    log.info("%s: champion is now v%s%s", model_name, new, f" (previous v{old})" if old else "")


def _restore(isvc: dict, before: dict) -> dict:
    restored = {**isvc, "spec": before["spec"]}
    restored["metadata"] = {
        **isvc["metadata"],
        "annotations": before["metadata"].get("annotations") or {},
    }
    return restored


def _model_name(rollout: Rollout) -> str:
    if not rollout.model_name:
        raise ClusterError(
            f"InferenceService {rollout.name!r} has no fineserve.io/registered-model annotation: "
            "it was not deployed by fineserve, so its MLflow model is unknown"
        )
    return rollout.model_name


def _check_version(client: MlflowClient, model_name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(model_name, version)
    except MlflowException as err:
        raise RegistryError(
            f"MLflow has no version {version} of {model_name!r} ({err.message}); the "
            "InferenceService and the registry disagree, nothing was changed"
        ) from err
