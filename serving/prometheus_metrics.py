"""Prometheus metrics of the predictor, served on ModelServer's `/metrics` (default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
MODEL_INFO = Gauge("fineserve_model_info", "The served model (always 1)", (*LABELS, "device"))


class ModelMetrics:
    """The metric children of one served model, labelled with its name and version."""

    def __init__(self, model_name: str, model_version: str, device: str) -> None:
        labels = {"model_name": model_name, "model_version": model_version}
        self._batch_size = BATCH_SIZE.labels(**labels)
        self._queue_seconds = QUEUE_SECONDS.labels(**labels)
        self.texts = TEXTS.labels(**labels)
        MODEL_INFO.labels(**labels, device=device).set(1)

    def observe_batch(self, num_texts: int, waits: list[float]) -> None:
        """Record one forward pass (a `DynamicBatcher` observer)."""
        self._batch_size.observe(num_texts)
        self.texts.inc(num_texts)
        for wait in waits:
            self._queue_seconds.observe(wait)
