"""The KServe predictor: a `kserve.Model` that classifies texts through a dynamic batcher."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from kserve import Model
from kserve.logging import logger
from kserve.protocol.infer_type import InferRequest, InferResponse

from fineserve.serving import protocol
from fineserve.serving.batcher import DynamicBatcher
from fineserve.serving.compiled import COMPILE_MODES
from fineserve.serving.engine import UNPAD_MODES, TextClassifier, pick_device, plan_workers
from fineserve.serving.forward_processes import (
    FORWARD_IN,
    ForwardProcesses,
    NoForwardProcess,
    child_settings,
    uses_processes,
)
from fineserve.serving.http_guards import ModelUnavailable
from fineserve.serving.memory import IdleMemoryTrimmer
from fineserve.serving.precision import PRECISIONS, ProbeSettings
from fineserve.serving.prometheus_metrics import ModelMetrics


@dataclass(frozen=True)
class ServeOptions:
    """Knobs of the predictor (CLI flags of the same names)."""

    max_batch_size: int = 32
    max_batch_wait_ms: float = 5.0
    forward_workers: int = 0  # 0: 2 on CPU (1 thread each with 2 cores), 1 on a GPU
    max_batch_tokens: int = 0  # 0: 512 on CPU, 16384 on a GPU
    max_texts_per_request: int = 64
    max_request_bytes: int = 1 << 20
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 where native and the probe passes, else float32
    probe_texts: int = 256  # probe texts a reduced precision is checked on; 0: no probe
    probe_min_agreement: float = 0.99  # least share of probe texts keeping their class
    probe_max_probability_diff: float = 0.1  # most a probability may move on the probe
    probe_tie_margin: float = 0.02  # class changes between classes this close are near-ties
    unpad: str = "auto"  # auto: Linear layers skip padding rows if a load-time check agrees
    compile: str = "auto"  # auto: torch.compile bfloat16 on a CPU (see fineserve.serving.compiled)
    forward_in: str = "auto"  # auto: forward passes in child processes on a CPU, threads on a GPU
    enable_model_repository: bool = False  # allow load/unload over HTTP and gRPC

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_texts_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_batch_tokens", "forward_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_batch_wait_ms < 0:
            raise ValueError("max_batch_wait_ms must not be negative")
        if self.unpad not in UNPAD_MODES:
            raise ValueError(f"unpad must be one of {UNPAD_MODES}, not {self.unpad!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, not {self.compile!r}")
        if self.forward_in not in FORWARD_IN:
            raise ValueError(f"forward_in must be one of {FORWARD_IN}, not {self.forward_in!r}")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {PRECISIONS}, not {self.dtype!r}")
        self.probe  # noqa: B018  (validates the probe settings)

    @property
    def probe(self) -> ProbeSettings:
        """The accuracy probe's settings."""
        return ProbeSettings(
            self.probe_texts,
            self.probe_min_agreement,
            self.probe_max_probability_diff,
            self.probe_tie_margin,
        )


class TextClassifierModel(Model):
    """Serves a fineserve HF directory over v1 (`:predict`) and v2 (REST and gRPC).

    Ready means it can answer now: loaded, and (with forward processes) at least one of them
    running. KServe reads `ready` for every readiness endpoint (HTTP v1 and v2, gRPC
    `ServerReady`/`ModelReady`, through `healthy()`) and before every inference request, so
    it is a property of the live children, not a flag set once at load. The forward
    processes are KServe's "engine" of the model: `start_engine` runs on the server's event
    loop as it starts (kserve/model_server.py), and has the loop watch the children.
    """

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        options: ServeOptions,
        model_version: str | None = None,
    ) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.options = options
        self.model_version = model_version  # None: from fineserve.json or the environment
        self.classifier: TextClassifier | None = None
        self.batcher: DynamicBatcher | None = None
        self.processes: ForwardProcesses | None = None
        self.metrics: ModelMetrics | None = None
        self.memory = IdleMemoryTrimmer()

    @property
    def ready(self) -> bool:
        """Loaded, and able to answer now (a forward process is running, if they are used)."""
        processes = self.processes
        return self._ready and (processes is None or processes.ready)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    @property
    def unavailable_reason(self) -> str | None:
        """Why the model cannot answer now (None when it is ready)."""
        if self.ready:
            return None
        if self._ready and self.processes is not None:
            return self.processes.unavailable_reason
        return "it is not loaded"

    def load(self) -> bool:
        """Load weights and tokenizer, warm up once, and set up the batcher."""
        opts = self.options
        workers, threads = plan_workers(pick_device(opts.device), opts.forward_workers)
        self.classifier = TextClassifier(
            self.model_dir,
            device=opts.device,
            dtype=opts.dtype,
            max_batch_size=opts.max_batch_size,
            max_batch_tokens=opts.max_batch_tokens,
            threads=threads,
            unpad=opts.unpad,
            compile=opts.compile,
            model_version=self.model_version,
            probe=opts.probe,
        )
        padding = "padded" if self.classifier.unpadded is None else "skipped in Linear layers"
        if uses_processes(opts.forward_in, self.classifier.device.type):
            self.processes = ForwardProcesses(child_settings(self.classifier, threads), workers)
            self.processes.start()  # each child loads (and warms up) the model as decided above
            self.classifier.release_model()  # this process only tokenizes from now on
            self.engine = True  # KServe then awaits `start_engine` on its event loop
        else:
            self.classifier.predict_proba(["warm-up"])
        gc.collect()
        gc.freeze()  # the loaded libraries' objects: no full-GC pauses walking them under load
        self.metrics = ModelMetrics(
            self.name,
            self.classifier.model_version,
            str(self.classifier.device),
            self.classifier.labels,
            precision=self.classifier.precision,
            probe=self.classifier.probe,
        )
        self.batcher = DynamicBatcher(
            self.classifier,
            max_batch_size=opts.max_batch_size,
            max_batch_wait_s=opts.max_batch_wait_ms / 1000,
            workers=workers,
            observer=self.metrics.observe_batch,
            forward=None if self.processes is None else self.processes.run,
        )
        logger.info(
            "loaded %s (version %s, %d labels, max_length %d) on %s in %s (%s); batches of "
            "up to %d texts (%d padded tokens), %d forward %s x %d thread(s), %s, padding "
            "rows %s",
            self.model_dir,
            self.classifier.model_version,
            self.classifier.num_labels,
            self.classifier.max_length,
            self.classifier.device,
            self.classifier.precision,
            self.classifier.precision_reason,
            opts.max_batch_size,
            self.classifier.max_batch_tokens,
            workers,
            "thread(s)" if self.processes is None else "process(es)",
            torch.get_num_threads(),
            "compiled (torch.compile)" if self.classifier.compiled else "eager",
            padding,
        )
        self.ready = True
        return self.ready

    async def start_engine(self) -> None:
        """On the server's event loop as it starts: watch the forward processes from it.

        A child that dies, even idle, is then seen at once: readiness drops as the last one
        goes, and a replacement starts.
        """
        self.processes.watch()
        await super().start_engine()

    def stop(self) -> None:
        """Stop the forward processes (on shutdown, and when the model is unloaded)."""
        super().stop()
        if self.processes is not None:
            self.processes.close()
            self.processes = None

    async def explain(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        """No explainer: a 404 that says so (KServe answers 501, a server fault)."""
        raise protocol.NotServed(
            f"model {self.name!r} has no explainer: use :predict (v1) or /infer (v2)"
        )

    def metadata(self) -> dict[str, object]:
        """What the v2 model metadata adds: the version, and the precision as the platform."""
        return {
            "versions": [self.classifier.model_version],
            "platform": f"pytorch_{self.classifier.precision}",
        }

    def get_input_types(self) -> list[dict]:
        """The v2 model metadata of the inputs."""
        return protocol.input_metadata()

    def get_output_types(self) -> list[dict]:
        """The v2 model metadata of the outputs."""
        return protocol.output_metadata(self.classifier.num_labels)

    async def predict(
        self, payload: dict | InferRequest, headers: dict[str, str] | None = None
    ) -> dict | InferResponse:
        """Validate the texts (400 on bad input), classify them in a batch, answer in kind."""
        self.memory.started()
        try:
            return await self._predict(payload, headers)
        finally:
            self.memory.finished()

    async def _predict(
        self, payload: dict | InferRequest, headers: dict[str, str] | None
    ) -> dict | InferResponse:
        limit = self.options.max_texts_per_request
        if isinstance(payload, InferRequest):
            version = self.classifier.model_version
            protocol.check_version(self.name, payload.model_version, version)
            protocol.requested_outputs(payload)  # refuse unknown outputs before the work
            texts = protocol.texts_from_v2(payload, limit)
        else:
            json_body = "json" in (headers or {}).get("content-type", "")
            texts = protocol.texts_from_v1(payload, limit, json_body)
        try:
            probs = await self.batcher.submit(texts)
        except NoForwardProcess as exc:  # the last child died under this request: a 503
            raise ModelUnavailable(self.name, str(exc)) from exc
        self.metrics.observe_predictions(probs)
        labels = self.classifier.labels
        if isinstance(payload, InferRequest):
            version = self.classifier.model_version
            return protocol.v2_response(payload, probs, labels, self.name, version)
        return protocol.v1_response(probs, labels)
