"""Which model locations KServe's storage initializer can fetch a model directory from.

An InferenceService's `storageUri` is downloaded into `/mnt/models` by KServe's storage
initializer (the `kserve-storage` package). It reads object stores and volumes, not MLflow's
own URIs: a version logged to an MLflow server that proxies artifacts has a
`mlflow-artifacts:/` location, which it cannot fetch. The deploy step refuses such a location
before it touches the cluster, and says what to configure.
"""

from __future__ import annotations

import re

from fineserve.core.errors import RegistryError

#: Schemes whose directories the storage initializer downloads (Azure: https://*.blob/file...).
DIRECTORY_SCHEMES = ("s3://", "gs://", "pvc://", "hf://", "oci://")
_AZURE = re.compile(r"^https://[^/]+\.(blob|file)\.(core\.windows\.net|storage\.azure\.net)/")

_CONFIGURE = (
    "log models to an object store KServe can read: run the MLflow server with "
    "--default-artifact-root s3://BUCKET/PATH --no-serve-artifacts (manifests/ does), or set "
    "the experiment's artifact_location to s3://, gs:// or an Azure blob URL"
)


def check_storage_uri(uri: str) -> str:
    """``uri`` if KServe's storage initializer can fetch a model directory from it; else why not."""
    if uri.startswith(DIRECTORY_SCHEMES) or _AZURE.match(uri):
        return uri
    if uri.startswith("mlflow-artifacts:"):
        reason = "it is proxied by the MLflow server, which KServe cannot download from"
    elif uri.startswith(("runs:/", "models:/", "dbfs:/")):
        reason = "it is an MLflow URI, which KServe cannot resolve"
    elif uri.startswith(("http://", "https://")):
        reason = "over plain HTTP KServe fetches single files, not a model directory"
    else:
        reason = "it is a path on this machine, not one the cluster can reach"
    raise RegistryError(f"KServe cannot read the model location {uri!r}: {reason}; {_CONFIGURE}")
