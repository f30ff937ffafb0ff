"""Run the predictor in KServe's ModelServer (REST v1/v2, gRPC v2, /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from kserve import ModelServer
from kserve import model_server as kserve_model_server
from kserve.logging import logger
from kserve.protocol.grpc import server as kserve_grpc_server
from timing_asgi import TimingMiddleware

from fineserve.serving.http_guards import (
    GuardedDataPlane,
    install_http_guards,
    quiet_expected_errors,
)
from fineserve.serving.predictor import ServeOptions, TextClassifierModel
from fineserve.serving.prometheus_metrics import GRPCRequestMetrics, HTTPRequestMetrics
from fineserve.serving.repository import (
    FixedModelRepository,
    RepositoryChangesDisabled,
    repository_disabled_handler,
)


class FineserveModelServer(ModelServer):
    """ModelServer whose bad-input paths answer 4xx (see `fineserve.serving.http_guards`).

    It also runs on the event loop ``--event-loop`` names (KServe's `start` runs
    `asyncio.run`, which ignores it), and KServe's per-request timing log lines follow
    ``--enable_latency_logging`` (KServe writes them always).
    """

    def __init__(
        self, *, max_request_bytes: int, enable_model_repository: bool = False, **kwargs: Any
    ) -> None:
        if kwargs.get("workers", 1) != 1:
            raise ValueError(
                "--workers must be 1: requests are batched inside one process; "
                "scale out with more replicas instead"
            )
        # KServe's gRPC server reads its limits from the module's parsed args: one size limit
        # for both protocols (KServe's own default lets 8 MiB texts through)
        kserve_model_server.args.grpc_max_receive_message_length = max_request_bytes
        super().__init__(**kwargs)
        self.dataplane = GuardedDataPlane(model_registry=self.registered_models)
        if not enable_model_repository:
            self.model_repository_extension = FixedModelRepository(self.registered_models)
        kserve_model_server.app.add_exception_handler(
            RepositoryChangesDisabled, repository_disabled_handler
        )
        install_http_guards(kserve_model_server.app, max_request_bytes, self._served_version)
        wrap_middleware(kserve_model_server.app, latency_logging=self.enable_latency_logging)
        quiet_expected_errors()

    def setup_event_loop(self) -> None:
        """Called by `start` before `asyncio.run`: have that run make the loop asked for.

        KServe's own settings of the loop are made in `_serve`, on the loop that runs.
        """
        use_event_loop(self.event_loop)

    async def _serve(self) -> None:
        super().setup_event_loop()  # exception handler, default executor: on the running loop
        logger.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
        await super()._serve()

    def _served_version(self, model_name: str) -> str | None:
        model = self.registered_models.get_model(model_name)
        classifier = getattr(model, "classifier", None)
        return classifier.model_version if classifier is not None else None


def use_event_loop(kind: str) -> str:
    """Make `asyncio.run` use the loop ``kind`` names (uvicorn's choices); the one it will use.

    ``auto`` means uvloop where it is installed (it is in the image), else asyncio's own.
    (Event-loop policies are deprecated from Python 3.14; the image runs 3.11.)
    """
    if kind not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"--event-loop must be auto, asyncio or uvloop, not {kind!r}")
    if kind == "asyncio":
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    try:
        import uvloop
    except ImportError as exc:
        if kind == "uvloop":
            raise ValueError("--event-loop uvloop was asked for but is not installed") from exc
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def wrap_middleware(app: FastAPI, *, latency_logging: bool) -> None:
    """Count and time every request of both protocols (`fineserve_requests_total`, ...).

    Without ``latency_logging`` every `TimingMiddleware` goes (KServe's, or one added): its
    only effect is two log lines per request, and a `getrusage` call either side of it, on
    the event loop. KServe's Prometheus latency histograms do not depend on it.
    """
    build_stack = app.build_middleware_stack

    def build() -> Any:
        if not latency_logging:
            app.user_middleware = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
        return HTTPRequestMetrics(build_stack())  # outermost: 413s and 415s are counted too

    app.build_middleware_stack = build
    # KServe's gRPC server builds its interceptors from this module name when it starts
    kserve_grpc_server.ExceptionToStatusInterceptor = GRPCRequestMetrics


def serve(
    model_dir: str | Path,
    *,
    model_name: str,
    options: ServeOptions,
    model_version: str | None = None,
    **server_kwargs: Any,
) -> None:
    """Load the model, then serve it until SIGTERM/SIGINT (``server_kwargs`` go to ModelServer).

    The server is made first: it configures KServe's logging, which the load then logs to.
    KServe's per-request latency log lines are off unless asked for: /metrics has latencies.
    A port already taken ends it (exit code 1) before the load, and however serving ends
    (a bind that fails after all, a crash, SIGTERM) the forward processes are stopped: uvicorn
    answers a failed bind with `sys.exit(1)` from inside the event loop, and the exit would
    otherwise wait forever in multiprocessing's exit hook, which joins children that ignore
    the SIGTERM it sends them (they ignore it so that a signal to the whole process group
    lets the server drain its requests through them).
    """
    server_kwargs.setdefault("enable_latency_logging", False)
    server = FineserveModelServer(
        max_request_bytes=options.max_request_bytes,
        enable_model_repository=options.enable_model_repository,
        **server_kwargs,
    )
    log_like_kserve()
    try:
        check_ports_free(server.http_port, server.grpc_port if server.enable_grpc else None)
    except PortInUse as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
    model = TextClassifierModel(model_name, model_dir, options, model_version)
    model.load()
    try:
        server.start([model])
    finally:
        model.stop()


class PortInUse(OSError):
    """A port the server must listen on is taken."""


def check_ports_free(http_port: int, grpc_port: int | None) -> None:
    """Raise `PortInUse` if the HTTP or gRPC port cannot be bound (before a long model load).

    Binds as the servers will, then lets go: uvicorn binds 0.0.0.0 with SO_REUSEADDR
    (uvicorn/config.py, `Config.bind_socket`); gRPC binds [::], IPv4 and IPv6
    (kserve/protocol/grpc/server.py), with SO_REUSEPORT, which would let it share a port with
    another gRPC server: refused here, requests would be split between the two.
    """
    ports = [("HTTP", http_port)] + ([("gRPC", grpc_port)] if grpc_port is not None else [])
    if grpc_port == http_port:
        raise PortInUse(f"the HTTP and the gRPC server are both given port {http_port}")
    for what, port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:  # no IPv6 here
                continue
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    raise PortInUse(
                        f"cannot listen on the {what} port {port} ({host}): {exc.strerror}; "
                        "stop what uses it or choose another port"
                    ) from exc


def log_like_kserve() -> None:
    """Send the `fineserve` loggers (the engine's WARNINGs, say) through KServe's handlers."""
    from kserve.logging import logger as kserve_logger

    ours = logging.getLogger("fineserve")
    if ours.handlers or not kserve_logger.handlers:
        return  # configured by the user, or KServe's logging is off
    for handler in kserve_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
