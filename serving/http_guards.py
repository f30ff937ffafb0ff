"""Clear answers to what the predictor cannot serve: 4xx for bad HTTP input, 503 while unable.

Bad input: body size limit, unparseable bodies, binary decoding, unknown models and versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.logging import KSERVE_LOGGER_NAME
from kserve.model import BaseKServeModel
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fineserve.serving.protocol import NotServed, check_version


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body it cannot parse, as a 400 naming the problem in KServe's shape."""
    errors = exc.errors()
    # the v2 body is typed InferenceRequest | bytes: the "not bytes" alternative is noise
    errors = [e for e in errors if tuple(e.get("loc", ()))[-1:] != ("bytes",)] or errors
    problems = []
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", error.get("msg", ""))
            problems.append(f"malformed JSON in request body ({detail})")
            continue
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "InferenceRequest")]
        problems.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    return _error(400, "invalid inference request: " + "; ".join(problems))


#: A body over the limit is read and dropped, up to this many bytes and seconds, before the
#: 413 is sent: a client that sends its whole body before it reads (Python's urllib, ...) then
#: reads the 413. Closing a socket with unread data makes the kernel answer with a reset, which
#: such a client gets instead of the answer.
DRAIN_MAX_BYTES = 256 << 20
DRAIN_MAX_S = 30.0


def _too_large(max_request_bytes: int) -> JSONResponse:
    response = _error(
        413,
        f"request body is larger than the limit of {max_request_bytes} bytes "
        "(--max_request_bytes); send fewer or shorter texts per request",
    )
    response.headers["connection"] = "close"  # the rest of the body is not read (past a drain)
    return response


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, within DRAIN_MAX_BYTES and DRAIN_MAX_S."""

    async def read_to_end() -> None:
        drained = 0
        while drained <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return  # the body ended, or the client went away
            drained += len(message.get("body", b""))

    with contextlib.suppress(asyncio.TimeoutError):  # (py3.10 raises asyncio's own)
        await asyncio.wait_for(read_to_end(), DRAIN_MAX_S)


def _drain_before_413(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """For a body of unknown length (chunked): if the app answers 413, drain the body first."""
    ended = False

    async def tracked_receive() -> Message:
        nonlocal ended
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            ended = True
        return message

    async def draining_send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 413 and not ended:
            await _drain(receive)
        await send(message)

    return tracked_receive, draining_send


_VERSIONED = re.compile(r"^/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/.*)?$")


class HTTPMiddleware:
    """An ASGI middleware for HTTP requests; anything else (lifespan) passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand HTTP requests to `handle`, anything else to the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request."""
        raise NotImplementedError


class RequestGuard(HTTPMiddleware):
    """Checks a request's head before the app reads its body.

    - A Content-Length over the limit gets the 413 that names it. Starlette's body limiter
      replaces any answer to such a request with a plain "Content Too Large", so this check
      runs outside it. The body is drained first (bounded), unless the client waits for a
      "100 Continue" before sending it; so is a chunked body the app answers 413 to.
    - A Content-Encoding (gzip, ...) gets a 415: bodies are read as they come.
    - `/v2/models/NAME/versions/V/...` is served as `/v2/models/NAME/...` when V is the
      version served (KServe answers 501 to any version), else a 404 naming the served one;
      for a model not served at all, KServe's 404 on the unversioned path names it.
    """

    def __init__(
        self, app: ASGIApp, max_request_bytes: int, served_version: Callable[[str], str | None]
    ) -> None:
        super().__init__(app)
        self.max_request_bytes = max_request_bytes
        self.served_version = served_version

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer bad heads (413, 415, 404) at once; pass anything else on."""
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            if headers.get("expect", "").lower() != "100-continue":  # else: no body is coming
                await _drain(receive)
            await _too_large(self.max_request_bytes)(scope, receive, send)
            return
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            message = f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
            await _error(415, message)(scope, receive, send)
            return
        versioned = _VERSIONED.match(scope["path"])
        if versioned:
            name, version = versioned.group("name"), versioned.group("version")
            served = self.served_version(name)
            if served is not None:
                try:
                    check_version(name, version, served)
                except NotServed as err:
                    await _error(404, err.reason)(scope, receive, send)
                    return
            path = f"/v2/models/{name}{versioned.group('rest') or ''}"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if not declared and "chunked" in headers.get("transfer-encoding", "").lower():
            receive, send = _drain_before_413(receive, send)
        await self.app(scope, receive, send)


def http_error_handler(max_request_bytes: int) -> Callable[[Request, HTTPException], Any]:
    """FastAPI's HTTP errors, with the body-limit 413 and unparseable-body 400 made specific."""

    async def handle(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 413:  # a body over the limit that declared no Content-Length
            return _too_large(max_request_bytes)
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, RecursionError):
            return _error(
                400,
                "request body is nested too deeply to parse as JSON; a v2 request is an object "
                'with an "inputs" list of tensors',
            )
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            return _error(
                400,
                f"request body is not valid UTF-8: {cause.reason} "
                f"(byte {cause.object[cause.start : cause.start + 1]!r} at offset {cause.start})",
            )
        return await http_exception_handler(request, exc)

    return handle


def install_http_guards(
    app: FastAPI, max_request_bytes: int, served_version: Callable[[str], str | None]
) -> None:
    """Limit request bodies and make FastAPI's own input errors clear 4xx answers.

    ``served_version`` gives the version a model name serves (None: no such model).
    """
    if not hasattr(app, "max_body_size"):
        raise RuntimeError("this FastAPI has no request body limit (max_body_size); upgrade it")
    app.max_body_size = max_request_bytes  # read when the middleware stack is built
    build_stack = app.build_middleware_stack  # user middleware would run inside the limiter
    app.build_middleware_stack = lambda: RequestGuard(
        CancelOnDisconnect(build_stack()), max_request_bytes, served_version
    )
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler(max_request_bytes))


class ModelUnavailable(ModelNotReady):
    """A model that cannot answer now (e.g. no forward process runs): HTTP 503, gRPC UNAVAILABLE.

    KServe's gRPC interceptor answers with the exception's ``reason``
    (kserve/protocol/grpc/interceptors.py), which its ModelNotReady lacks.
    """

    def __init__(self, model_name: str, reason: str | None) -> None:
        super().__init__(model_name)
        if reason:
            self.error_msg = f"model {model_name!r} cannot answer now: {reason}; try again shortly"
        self.reason = self.error_msg


class GuardedDataPlane(DataPlane):
    """KServe's DataPlane, with v2 bodies it cannot decode reported as a 400 naming the problem.

    Ready means a model can answer: KServe's says ready with no model loaded at all. Model
    metadata carries what the model's `metadata()` adds (its version, its precision). A model
    not served is a 404 naming what is; one that cannot answer now is a 503 saying why, at
    once (KServe's `get_model` would load it again, on the event loop).
    """

    def _not_served(self, model_name: str) -> NotServed:
        served = ", ".join(repr(name) for name in self._model_registry.get_models()) or "none"
        return NotServed(
            f"model {model_name!r} does not exist here; this predictor serves {served}"
        )

    def _registered(self, model_name: str) -> BaseKServeModel:
        model = self._model_registry.get_model(model_name)
        if model is None:
            raise self._not_served(model_name)
        return model

    def get_model_from_registry(self, name: str) -> BaseKServeModel:
        """The model called ``name``; a 404 naming the served ones if there is none."""
        return self._registered(name)

    async def get_model(self, name: str) -> BaseKServeModel:
        """The model called ``name``, ready to answer; else a 404, or a 503 saying why."""
        model = self._registered(name)
        if not await model.healthy():
            raise ModelUnavailable(name, getattr(model, "unavailable_reason", None))
        return model

    async def model_ready(
        self, model_name: str, disable_predictor_health_check: bool = False
    ) -> bool:
        """Whether the model is ready; on a request's path, a 503 saying why it is not.

        KServe's request handlers (rest/v1_endpoints.py, rest/v2_endpoints.py) ask with
        ``disable_predictor_health_check=True`` and answer a bare 503 on False; the readiness
        endpoints ask without it and get the bool.
        """
        model = self._registered(model_name)
        ready = await super().model_ready(model_name, disable_predictor_health_check)
        if not ready and disable_predictor_health_check:
            raise ModelUnavailable(model_name, getattr(model, "unavailable_reason", None))
        return ready

    async def ready(self) -> bool:
        """True when at least one model is loaded and every loaded model is ready."""
        names = list(self._model_registry.get_models())
        if not names:
            return False
        for name in names:
            if not await self._model_registry.is_model_ready(name):
                return False
        return await super().ready()

    async def model_metadata(self, model_name: str) -> dict:
        """KServe's v2 metadata, plus what the model adds (fineserve: version and precision)."""
        metadata = await super().model_metadata(model_name)
        extra = getattr(self.get_model_from_registry(model_name), "metadata", None)
        return {**metadata, **extra()} if callable(extra) else metadata

    def decode_inference_request(
        self, body: bytes | InferenceRequest, headers: dict, model_name: str
    ) -> InferRequest:
        """Decode a v2 body, turning a malformed one into InvalidInput (a 400)."""
        if isinstance(body, bytes) and INFERENCE_CONTENT_LENGTH_HEADER not in headers:
            if "json" in headers.get("content-type", ""):  # parsed as JSON: not an object
                raise InvalidInput(
                    'request body must be a JSON object (a v2 inference request with an "inputs" '
                    "list), not a JSON string"
                )
            raise InvalidInput(
                f"request body has Content-Type {headers.get('content-type', '(none)')!r}: "
                "send JSON with Content-Type: application/json (or binary tensors with the "
                f"{INFERENCE_CONTENT_LENGTH_HEADER} header)"
            )
        try:
            return super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except (InferenceError, KeyError, TypeError, ValueError, struct.error) as exc:
            reason = exc.reason if isinstance(exc, InferenceError) else repr(exc)
            raise InvalidInput(f"malformed binary inference request: {reason}") from exc


class ExpectedErrorsAsWarnings(logging.Filter):
    """KServe logs each 400/404/503 it answers as an ERROR with a traceback; make it one WARNING.

    A caller's bad request is not a server fault, and a 503 while no forward process runs (or
    a readiness probe's "not ready") repeats a cause logged once where it happened: neither
    should page anyone or bury real errors under tracebacks. Other exceptions keep KServe's
    ERROR and traceback.
    """

    CLIENT_ERRORS = (InvalidInput, ModelNotFound)
    NOT_READY = (ModelNotReady, ServerNotReady)

    def filter(self, record: logging.LogRecord) -> bool:
        """Turn an expected error's ERROR with traceback into one WARNING line; keep the rest."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.CLIENT_ERRORS):
            answered = "client error, answered 4xx"
        elif isinstance(exc, self.NOT_READY):
            answered = "not ready, answered 503"
        else:
            return True
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "%s: %s: %s", (answered, type(exc).__name__, exc)
        record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors() -> None:
    """Log KServe's answers to bad requests and while not ready as one WARNING line each."""
    kserve_logger = logging.getLogger(KSERVE_LOGGER_NAME)
    if not any(isinstance(f, ExpectedErrorsAsWarnings) for f in kserve_logger.filters):
        kserve_logger.addFilter(ExpectedErrorsAsWarnings())


class CancelOnDisconnect(HTTPMiddleware):
    """ASGI middleware: a request whose client hung up is cancelled, not worked on.

    Uvicorn does not stop a handler when its client goes: the texts of a request nobody waits
    for any more would be tokenized and run, ahead of requests whose clients still wait. Once
    the body is read, the next message from the server is `http.disconnect` (or comes when the
    answer is complete); arriving before that, it cancels the handler, and the batcher skips
    texts whose caller was cancelled.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; cancel it if its client disconnects before the answer is sent."""
        answered = False
        watcher: asyncio.Future | None = None  # the next message once the body is read

        def client_gone(message: asyncio.Future) -> None:
            if not message.cancelled() and not answered:
                handler.cancel()

        async def app_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the app listens too (e.g. a streaming answer): share it
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                watcher = asyncio.ensure_future(receive())
                watcher.add_done_callback(client_gone)
            return message

        async def app_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True  # before the send: the answer's end is no hang-up
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        try:
            await handler
        except asyncio.CancelledError:
            if not handler.cancelled():
                raise
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
