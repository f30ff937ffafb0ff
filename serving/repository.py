"""The model repository API of a predictor that serves one model: off unless enabled.

KServe's ModelServer answers `POST /v2/repository/models/NAME/unload` (and gRPC
`RepositoryModelUnload`) for anyone: one unauthenticated request takes the model offline, and
a load cannot bring it back. fineserve's predictor serves exactly the model it started with,
so load and unload are refused (HTTP 403, gRPC PERMISSION_DENIED) unless the server was started
with `--enable_model_repository`.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import PermissionDenied
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

ENABLE_FLAG = "--enable_model_repository"


class RepositoryChangesDisabled(PermissionDenied):
    """A load or unload asked of a predictor whose model repository API is off."""

    def __init__(self, action: str, model_name: str) -> None:
        super().__init__(
            f"{action} of model {model_name!r} is disabled: this predictor serves one model; "
            f"start it with {ENABLE_FLAG} to allow {action} requests"
        )


class FixedModelRepository(ModelRepositoryExtension):
    """The repository extension with load and unload refused; listing models still works."""

    async def load(self, model_name: str) -> None:
        """Refuse: the served model is fixed."""
        raise RepositoryChangesDisabled("load", model_name)

    async def unload(self, model_name: str) -> None:
        """Refuse: the served model is fixed."""
        raise RepositoryChangesDisabled("unload", model_name)


async def repository_disabled_handler(_: Request, exc: RepositoryChangesDisabled) -> JSONResponse:
    """The HTTP answer to a refused load or unload: 403 with the reason."""
    return JSONResponse(status_code=403, content={"error": exc.details})
