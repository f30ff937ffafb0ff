"""Prometheus metrics of the predictor, served on ModelServer's `/metrics` (default registry)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import Message, Receive, Scope, Send

from fineserve.serving.http_guards import HTTPMiddleware

if TYPE_CHECKING:
    from fineserve.serving.precision import ProbeResult

LABELS = ("model_name", "model_version")

BATCH_SIZE = Histogram(
    "fineserve_batch_size",
    "Texts per forward pass",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_SECONDS = Histogram(
    "fineserve_queue_seconds",
    "Time a request waited in the batching queue before its forward pass started",
    LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TEXTS = Counter("fineserve_texts", "Texts classified", LABELS)
MODEL_INFO = Gauge(
    "fineserve_model_info", "The served model (always 1)", (*LABELS, "device", "precision")
)
PROBE_AGREEMENT = Gauge(
    "fineserve_precision_probe_agreement",
    "Share of probe texts whose class the reduced precision tried at load (label precision) "
    "kept against float32; fineserve_model_info says whether it is served",
    (*LABELS, "precision"),
)
PROBE_MAX_DIFF = Gauge(
    "fineserve_precision_probe_max_probability_diff",
    "Largest probability move of the reduced precision tried at load (label precision) on "
    "the probe texts",
    (*LABELS, "precision"),
)
PREDICTIONS = Counter(
    "fineserve_predictions", "Texts answered, by the label predicted for them", (*LABELS, "label")
)
TOP_PROBABILITY = Histogram(
    "fineserve_top_probability",
    "Probability of the predicted (top) class of each text answered",
    LABELS,
    buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
#: The version each served model name answers as (request metrics carry it).
_VERSIONS: dict[str, str] = {}


class ModelMetrics:
    """The metric children of one served model, labelled with its name and version."""

    def __init__(
        self,
        model_name: str,
        model_version: str,
        device: str,
        labels: list[str] | None = None,
        precision: str = "float32",
        probe: ProbeResult | None = None,
    ) -> None:
        names = {"model_name": model_name, "model_version": model_version}
        self._batch_size = BATCH_SIZE.labels(**names)
        self._queue_seconds = QUEUE_SECONDS.labels(**names)
        self.texts = TEXTS.labels(**names)
        self._predictions = [PREDICTIONS.labels(**names, label=label) for label in labels or []]
        self._top_probability = TOP_PROBABILITY.labels(**names)
        MODEL_INFO.labels(**names, device=device, precision=precision).set(1)
        if probe is not None:
            PROBE_AGREEMENT.labels(**names, precision=probe.precision).set(probe.agreement)
            PROBE_MAX_DIFF.labels(**names, precision=probe.precision).set(
                probe.max_probability_diff
            )
        _VERSIONS[model_name] = model_version
        for protocol, endpoint, code in _INFER_SERIES:  # at 0: the first of each is counted
            REQUESTS.labels(protocol, endpoint, code, model_name, model_version)

    def observe_predictions(self, probabilities: np.ndarray) -> None:
        """Count the predicted label and record the top probability of each answered text."""
        top = probabilities.argmax(axis=1)
        for label_id, count in enumerate(np.bincount(top, minlength=len(self._predictions))):
            if count:
                self._predictions[label_id].inc(int(count))
        for probability in probabilities[np.arange(len(top)), top].tolist():
            self._top_probability.observe(probability)

    def observe_batch(self, num_texts: int, waits: list[float]) -> None:
        """Record one forward pass (a `DynamicBatcher` observer)."""
        self._batch_size.observe(num_texts)
        self.texts.inc(num_texts)
        for wait in waits:
            self._queue_seconds.observe(wait)


REQUESTS = Counter(
    "fineserve_requests",
    "Requests answered, by protocol (http, grpc), endpoint, status code and the model (name, "
    "version) the request named (empty for endpoints of no model)",
    ("protocol", "endpoint", "code", *LABELS),
)
REQUEST_SECONDS = Histogram(
    "fineserve_request_seconds",
    "Time from a request's arrival to the end of its answer (body read, texts classified, "
    "answer sent), by protocol, endpoint and model",
    ("protocol", "endpoint", *LABELS),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
#: Request counts of the inference endpoints, answered or failed, that exist from the load
#: (at 0): Prometheus' increase() cannot count a series' first sample, so a canary's first
#: server errors (or answers) would go unseen if their series began with them.
_INFER_SERIES = [
    (protocol, endpoint, code)
    for protocol, endpoints, codes in (
        ("http", ("/v2/models/{model}/infer", "/v1/models/{model}:predict"), ("200", "500")),
        ("grpc", ("ModelInfer",), ("OK", "INTERNAL")),
    )
    for endpoint in endpoints
    for code in codes
]
#: Endpoint labels of HTTP paths; any other path counts as "other" (a label per scanned path
#: would grow without bound).
_HTTP_ENDPOINTS = [
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/(infer|ready)$"), r"/v2/models/{model}/\2"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "/v2/models/{model}"),
    (
        re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$"),
        r"/v2/repository/models/{model}/\1",
    ),
    (re.compile(r"^/v1/models/[^/:]+:(predict|explain)$"), r"/v1/models/{model}:\1"),
    (re.compile(r"^/v1/models/[^/:]+$"), "/v1/models/{model}"),
    (re.compile(r"^/(v2/health/(live|ready)|v2|v1/models|v2/repository/index|metrics|)$"), r"/\1"),
]


_MODEL_IN_PATH = re.compile(r"^/v[12]/(?:repository/)?models/([^/:]+)")


def http_endpoint(path: str) -> str:
    """The endpoint label of an HTTP path: its route with the model name left out."""
    for pattern, label in _HTTP_ENDPOINTS:
        match = pattern.match(path)
        if match:
            return match.expand(label)
    return "other"


def http_model(path: str) -> str:
    """The model an HTTP path names, if this server serves it (else "": no label per typo)."""
    match = _MODEL_IN_PATH.match(path)
    return match.group(1) if match and match.group(1) in _VERSIONS else ""


def observe_request(
    protocol: str, endpoint: str, code: str, seconds: float, model: str = ""
) -> None:
    """Count one answered request and time it, labelled with the model it named."""
    version = _VERSIONS.get(model, "")
    REQUESTS.labels(protocol, endpoint, code, model, version).inc()
    REQUEST_SECONDS.labels(protocol, endpoint, model, version).observe(seconds)


class HTTPRequestMetrics(HTTPMiddleware):
    """ASGI middleware: counts and times every HTTP request, by endpoint and status code.

    A request cancelled because its client hung up is counted with code 499 (as nginx does).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; record its status when the answer's last byte is sent."""
        started, status, answered = time.perf_counter(), ["500"], [False]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered[0] = True
                seconds = time.perf_counter() - started
                observe_request("http", endpoint, status[0], seconds, model)

        path = scope["path"]
        endpoint, model = http_endpoint(path), http_model(path)
        await self.app(scope, receive, recording_send)
        if status[0] == "500" and not answered[0]:  # cancelled: its client hung up
            observe_request("http", endpoint, "499", time.perf_counter() - started, model)


class GRPCRequestMetrics(ExceptionToStatusInterceptor):
    """KServe's gRPC exception-to-status interceptor, counting and timing every call.

    A call its client cancelled is counted as CANCELLED, one whose deadline passed as
    DEADLINE_EXCEEDED: the status that client sees, and like HTTP's 499 not a server error.
    """

    async def intercept(self, method, request_or_iterator, context, method_name: str):
        """Run the call as KServe does; record the status code it ends with."""
        started = time.perf_counter()
        endpoint = method_name.rsplit("/", 1)[-1]
        model = getattr(request_or_iterator, "model_name", "")
        model = model if model in _VERSIONS else ""
        try:
            response = await super().intercept(method, request_or_iterator, context, method_name)
        except asyncio.CancelledError:
            code = client_gave_up(context)
            observe_request("grpc", endpoint, code.name, time.perf_counter() - started, model)
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            observe_request("grpc", endpoint, code.name, time.perf_counter() - started, model)
            raise
        code = context.code() or grpc.StatusCode.OK
        observe_request("grpc", endpoint, code.name, time.perf_counter() - started, model)
        return response


#: A cancelled call with less than this left before its deadline ended by the deadline: the
#: client's own timer fires first and its cancellation can arrive just before the server's.
DEADLINE_SLACK_SECONDS = 0.5


def client_gave_up(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler was cancelled: CANCELLED or DEADLINE_EXCEEDED.

    grpc.aio cancels a call's task only when the call ends on the client's side, cancelled or
    past its deadline (`_handle_cancellation_from_core` in grpc's
    `_cython/_cygrpc/aio/server.pyx.pxi`); ``context.cancelled()`` stays False then (it reads
    a status set by the handler), so the deadline tells the two apart.
    """
    remaining = context.time_remaining()  # None: the call had no deadline
    if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
