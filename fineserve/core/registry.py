"""MLflow Model Registry operations: a client, aliases, and where a version's model lives.

The register step, serving, and (next) the gate, deploy and rollout commands all go through
these functions, so an alias or a storage location means the same thing everywhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fineserve.core.artifacts import HF_MODEL_ARTIFACT, TAG_STORAGE_URI
from fineserve.core.defaults import local_tracking_uri
from fineserve.core.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

MODELS_SCHEME = "models:/"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use: ``explicit``, else $MLFLOW_TRACKING_URI, else `./mlflow.db`."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()


def mlflow_client(tracking_uri: str | None = None) -> MlflowClient:
    """An MLflow client for ``tracking_uri`` (resolved as `resolve_tracking_uri` does)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as err:
        raise RegistryError(f"MLflow cannot use the tracking URI {uri!r}: {err.message}") from err


def get_alias(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(client: MlflowClient, model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` of ``model_name``."""
    client.set_registered_model_alias(model_name, alias, str(version))


def delete_alias(client: MlflowClient, model_name: str, alias: str) -> None:
    """Remove ``alias`` from ``model_name``; no error when it is not set."""
    if get_alias(client, model_name, alias) is not None:
        client.delete_registered_model_alias(model_name, alias)


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` as (name, alias, version)."""
    if not uri.startswith(MODELS_SCHEME):
        raise RegistryError(f"{uri!r} is not a registry URI (models:/NAME@ALIAS or /VERSION)")
    rest = uri[len(MODELS_SCHEME) :]
    name, at, alias = rest.partition("@")
    if at:
        return name, alias, None
    name, _, version = rest.partition("/")
    return name, None, version or None


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str] | None:
    """(name, version) of a registry URI (``models:/NAME@ALIAS``, ``/VERSION``, ``/STAGE``).

    None for a ``models:/<logged model id>`` URI, which names no registry version.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    try:
        resolved = get_model_name_and_version(client, uri)
    except MlflowException as err:
        raise RegistryError(f"cannot resolve {uri!r} in the registry: {err.message}") from err
    if len(resolved) != 2:
        return None
    name, version = resolved
    return name, str(version)


def pin_registry_version(uri: str, client: MlflowClient | None = None) -> tuple[str, str | None]:
    """Pin a registry URI to the version it names now: (``models:/NAME/VERSION``, version).

    The version downloaded and the version reported are then the same even if the alias moves
    meanwhile. Any other URI comes back unchanged, with version None.
    """
    if not uri.startswith(MODELS_SCHEME):
        return uri, None
    resolved = resolve_version(client or mlflow_client(), uri)
    if resolved is None:
        return uri, None
    name, version = resolved
    return f"{MODELS_SCHEME}{name}/{version}", version


def model_dir_uri(client: MlflowClient, model_name: str, version: str) -> str:
    """Where the HF directory of a registered version is stored (what a storageUri points to).

    The `fineserve.storage_uri` tag set at registration when present, else the version's
    download URI joined with the `hf_model` artifact path.
    """
    from mlflow.exceptions import MlflowException

    try:
        tagged = client.get_model_version(model_name, str(version)).tags.get(TAG_STORAGE_URI)
    except MlflowException as err:
        raise RegistryError(
            f"MLflow has no version {version} of {model_name!r}: {err.message}"
        ) from err
    if tagged:
        return tagged
    root = client.get_model_version_download_uri(model_name, str(version)).rstrip("/")
    return f"{root}/artifacts/{HF_MODEL_ARTIFACT}"
