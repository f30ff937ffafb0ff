"""Load a fineserve HF directory and classify lists of texts (tokenize, length-bucket, forward)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fineserve.core.artifacts import ModelInfo, read_model_info, read_probe_texts
from fineserve.core.errors import DataError
from fineserve.serving import compiled as compiling
from fineserve.serving import pooling  # noqa: F401  (registers the mean-pooling head with the Auto classes)
from fineserve.serving import precision as precisions
from fineserve.serving.precision import ProbeResult, ProbeSettings
from fineserve.serving.unpad import UnpaddedLinears

logger = logging.getLogger(__name__)

#: Tokenizers without a limit report this sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 10**9
#: --unpad: auto skips padding rows in Linear layers when a load-time check agrees.
UNPAD_MODES = ("auto", "off")
#: How far skipping padding may move a probability before it is turned off, per precision.
_UNPAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3, "int8": 1e-2}


#: Padded tokens per forward pass when not configured: CPU throughput peaks around 512
#: (MiniLM-L6, 2 cores: sorted chunks of ~16 tweets); a GPU wants far wider passes.
CPU_BATCH_TOKENS = 512
#: Characters of a text the tokenizer sees, per token of max length: far more than
#: `max_length` tokens can need, and a bound on the tokenizer's work and memory per text.
CHARS_PER_TOKEN_BOUND = 32
GPU_BATCH_TOKENS = 16384


class ModelDirError(ValueError):
    """The model directory is missing or is not a servable fineserve classifier."""


class CompileError(Exception):
    """``--compile on`` was asked for, but torch.compile fails on a model that runs eager."""


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def default_batch_tokens(device: torch.device) -> int:
    """Token budget of one forward pass on ``device`` when none is configured."""
    return CPU_BATCH_TOKENS if device.type == "cpu" else GPU_BATCH_TOKENS


def available_cpus() -> int:
    """CPUs this process may use: affinity and cgroup v1 (KServe's count) and cgroup v2 quota."""
    from kserve.utils.utils import cpu_count

    count = cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def plan_workers(device: torch.device, forward_workers: int = 0) -> tuple[int, int]:
    """(concurrent forward passes, torch threads each); ``forward_workers=0`` picks for you.

    On CPU, two single-purpose workers beat one pass using every core (small matrices
    parallelise poorly): with 2 cores, 2 workers x 1 thread. A GPU runs one pass at a time.
    """
    if device.type != "cpu":
        return (forward_workers or 1), 0
    cpus = available_cpus()
    workers = forward_workers or min(2, cpus)
    return workers, max(1, cpus // workers)


def read_model_version(model_dir: Path) -> str:
    """`model_version` from fineserve.json, else $FINESERVE_MODEL_VERSION, else "unknown"."""
    version = _model_info(model_dir).get("model_version")
    if version not in (None, ""):
        return str(version)
    return os.environ.get("FINESERVE_MODEL_VERSION") or "unknown"


def _model_info(model_dir: Path) -> ModelInfo:
    """The directory's `fineserve.json`; {} for a model trained elsewhere."""
    try:
        return read_model_info(model_dir, missing_ok=True)
    except DataError as exc:
        raise ModelDirError(str(exc)) from exc


@dataclass(frozen=True)
class Chunk:
    """Indices (into the caller's list) of texts padded and run together."""

    indices: list[int]
    padded_len: int


def plan_chunks(lengths: list[int], max_texts: int, max_tokens: int) -> list[Chunk]:
    """Sort by token length and cut into chunks of similar length.

    A chunk holds at most ``max_texts`` texts and at most ``max_tokens`` padded tokens
    (texts x longest), so short texts ride in wide chunks and long ones in narrow chunks.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[Chunk] = []
    current: list[int] = []
    for index in order:
        longest = lengths[index]  # ascending order: the newcomer is the longest
        if current and (len(current) >= max_texts or (len(current) + 1) * longest > max_tokens):
            chunks.append(Chunk(current, lengths[current[-1]]))
            current = []
        current.append(index)
    if current:
        chunks.append(Chunk(current, lengths[current[-1]]))
    return chunks


@dataclass(frozen=True)
class ForwardJob:
    """Token ids of texts padded and run together; ``indices`` place them in their batch."""

    indices: list[int]
    ids: list[list[int]]


class TextClassifier:
    """A sequence-classification model plus its tokenizer, ready for batched inference."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        max_batch_tokens: int = 0,
        threads: int = 0,
        unpad: str = "auto",
        compile: str = "auto",  # noqa: A002  (the --compile flag)
        model_version: str | None = None,
        probe: ProbeSettings | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ModelDirError(f"{self.model_dir} has no config.json; not a HF model directory")
        if dtype == "int8" and device == "auto":
            device = "cpu"  # dynamic int8 quantization runs on the CPU only
        self.device = pick_device(device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)  # process-wide: intra-op threads of every pass
        target, self.precision_reason = precisions.choose(dtype, self.device)
        compiling.wanted(compile, target, self.device)  # validates the mode before the load
        self.compile_mode = compile
        self.compiled = False
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.precision = "float32"
        self.probe: ProbeResult | None = None
        self.model = self._load_float32()
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        if sorted(id2label) != list(range(self.model.config.num_labels)):
            raise ModelDirError(f"{self.model_dir}/config.json id2label does not cover every class")
        self.labels: list[str] = [id2label[i] for i in range(len(id2label))]
        self.max_length = self._max_length()
        self.model_version = model_version or read_model_version(self.model_dir)
        # a fast tokenizer resets its truncation state on every call and is not safe to call
        # from two threads at once ("Already borrowed"); forward passes are
        self._tokenizer_lock = threading.Lock()
        if unpad not in UNPAD_MODES:
            raise ValueError(f"unknown unpad mode {unpad!r}; choose one of {UNPAD_MODES}")
        self.unpadded: UnpaddedLinears | None = None
        if target != "float32":
            self._reduce_precision(target, dtype == "auto", probe or ProbeSettings())
        if self.precision == "float32":  # float32 from the start or after a failed probe
            self._compile_if_wanted()  # (a reduced precision was compiled before its probe)
        if unpad == "auto" and not self.compiled:
            self._skip_padding_if_outputs_agree()

    def release_model(self) -> None:
        """Free the weights and compiled graphs once passes run elsewhere (forward processes).

        Planning (tokenizing) still works; running a pass here no longer does.
        """
        self.model = None
        self.unpadded = None
        if self.compiled:
            torch._dynamo.reset()  # its caches hold the compiled graphs and their frozen weights
        gc.collect()

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the weights (int8 layers take and give float32)."""
        return precisions.LOAD_DTYPES[self.precision]

    def _load_float32(self) -> torch.nn.Module:
        """The model's float32 weights on the device (a reduced precision converts these)."""
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            dtype=torch.float32,
        )
        return model.to(self.device).eval()

    def _reduce_precision(self, target: str, auto: bool, probe: ProbeSettings) -> None:
        """Serve ``target`` if it passes the probe against float32 (see `precision`)."""
        texts = (read_probe_texts(self.model_dir) or [])[: probe.texts]
        if not texts:
            why = "probe off" if not probe.texts else f"{self.model_dir} has no probe texts"
            # auto takes no precision it cannot check, except bfloat16 on a GPU, where the
            # train step trains in it (and auto served it before models carried probe texts)
            if auto and self.device.type != "cuda":
                self.precision_reason = f"{self.precision_reason}, but {why}: float32"
                logger.warning("%s: serving float32 (%s)", self.model_dir, self.precision_reason)
                return
            self._serve_in(target)
            self.precision_reason = f"{self.precision_reason}, unchecked ({why})"
            if probe.texts:
                logger.warning("%s: serving %s unchecked: %s", self.model_dir, target, why)
            return
        reference = self.predict_proba(texts)
        try:
            self._serve_in(target)
            candidate = self.predict_proba(texts)
            self.probe = precisions.compare(reference, candidate, probe, target)
            failure = "" if self.probe.passed else (
                f"the probe failed ({self.probe.describe()}; limits "
                f"{probe.min_agreement:.2%} and {probe.max_probability_diff:g})"
            )  # fmt: skip
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # no kernel, no engine
            failure = f"{target} does not run here ({exc})"
        if not failure:
            self.precision_reason = f"{self.precision_reason}; probe: {self.probe.describe()}"
            return
        self.precision_reason = f"{self.precision_reason}, but {failure}: float32"
        logger.warning("%s: serving float32 instead of %s: %s", self.model_dir, target,
                       self.precision_reason)  # fmt: skip
        self.model = None  # free the reduced model before loading float32 again
        self.model = self._load_float32()
        self.precision = "float32"
        self.compiled = False

    def _serve_in(self, precision: str) -> None:
        """Convert the float32 model to ``precision`` (and compile it if --compile says so)."""
        self.model = precisions.reduce(self.model, precision)
        self.precision = precision
        self._compile_if_wanted()

    def _compile_if_wanted(self) -> None:
        """Compile the model if --compile asks for it in this precision; warm both graphs up.

        The warm-up compiles the single-text graph and the dynamic one, so no request waits
        for a compiler; after it, a pass no graph fits runs eager rather than compile in a
        worker. If compiling fails, auto serves eager passes with a WARNING.
        """
        if not compiling.wanted(self.compile_mode, self.precision, self.device):
            return
        self.predict_proba(["warm-up"])  # eager first: a precision without kernels fails as such
        eager = self.model
        self.model = compiling.compile_model(eager)
        try:
            with compiling.compiling_allowed():
                self.predict_proba(["warm-up"])
                self.predict_proba(["warm-up", "a warm-up pass of two texts"])
        except Exception as exc:  # noqa: BLE001  (no compiler, an op inductor lacks, ...)
            self.model = eager
            if self.compile_mode == "on":
                raise CompileError(f"--compile on, but torch.compile fails here: {exc}") from exc
            logger.warning(
                "%s: serving eager passes: torch.compile failed (%s)", self.model_dir, exc
            )
            return
        compiling.no_compiling_while_serving()
        self.compiled = True

    def _skip_padding_if_outputs_agree(self) -> None:
        """Skip padding in Linear layers unless that changes a probe batch's probabilities."""
        words = self.token_ids(["the quick brown fox jumps over the lazy dog " * 4])[0][1:-1]
        specials = self.token_ids([""])[0]  # e.g. [CLS] [SEP]
        first, last = specials[:1], specials[1:]
        probe = [first + words[:n] + last for n in (1, 5, 17, 30)]  # lengths 3-32: padded
        plain = self._forward(probe)
        self.unpadded = UnpaddedLinears(self.model)
        try:
            drift = float(np.abs(self._forward(probe) - plain).max())
            if drift <= _UNPAD_TOLERANCE[self.precision]:
                return
            why = f"moved probabilities by {drift:.2g}"
        except (RuntimeError, IndexError, ValueError) as exc:  # a layer refused packed rows
            why = f"failed ({exc})"
        self.unpadded.remove()
        self.unpadded = None
        logger.warning("%s: skipping padding %s; running padded passes", self.model_dir, why)

    def _max_length(self) -> int:
        limit = self.tokenizer.model_max_length
        if not limit or limit >= _NO_LIMIT:
            limit = _model_info(self.model_dir).get("max_length") or _NO_LIMIT
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            limit = min(int(limit), int(positions))
        if limit >= _NO_LIMIT:
            raise ModelDirError(f"{self.model_dir}: cannot tell the model's max sequence length")
        return int(limit)

    @property
    def num_labels(self) -> int:
        """How many classes the model tells apart."""
        return len(self.labels)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to the model's max length)."""
        bound = self.max_length * CHARS_PER_TOKEN_BOUND
        texts = [text[:bound] for text in texts]
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                texts, truncation=True, max_length=self.max_length, return_attention_mask=False
            )
        return encoded["input_ids"]

    def plan(self, texts: list[str]) -> list[ForwardJob]:
        """Tokenize ``texts`` and group them into forward passes of similar length."""
        ids = self.token_ids(texts)
        chunks = plan_chunks([len(x) for x in ids], self.max_batch_size, self.max_batch_tokens)
        return [ForwardJob(c.indices, [ids[i] for i in c.indices]) for c in chunks]

    def run(self, job: ForwardJob) -> np.ndarray:
        """Probabilities [len(job.indices), num_labels] of one planned forward pass."""
        return self._forward(job.ids)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, float32 [len(texts), num_labels], in the input order."""
        probs = np.empty((len(texts), self.num_labels), dtype=np.float32)
        for job in self.plan(texts):
            probs[job.indices] = self.run(job)
        return probs

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.model_dir}: the weights were released (release_model)")
        with self._tokenizer_lock:
            batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        mask = batch["attention_mask"]
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        if self.unpadded is None:
            logits = self.model(**batch).logits
        else:
            with self.unpadded.tokens(mask, self.device):
                logits = self.model(**batch).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()
