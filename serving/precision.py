"""The precision a model is served in, and the accuracy probe that guards a reduced one.

`--dtype auto` serves bfloat16 where the hardware executes it natively (a CUDA GPU with bf16,
or a CPU with AMX or AVX-512 BF16, where oneDNN runs bf16 matrix products several times
faster than float32) and float32 elsewhere. Any reduced precision (auto's bfloat16, or
bfloat16, float16 or int8 asked for by name) must first pass a probe: the model's own
evaluation texts, stored with it at registration (`fineserve-probe.json`), classified in
float32 and in the reduced precision. The reduced one is kept only if the predicted classes
agree on at least `ProbeSettings.min_agreement` of the texts and no probability moves by more
than `ProbeSettings.max_probability_diff`; otherwise (or if it does not run at all) the model
is served in float32 with a WARNING. Without probe texts (or with the probe off) a precision
asked for by name is trusted, and auto serves float32 on a CPU and bfloat16 on a GPU. int8 is
dynamic quantization of the Linear layers (torch's; CPU only): its activation scales are set
per forward pass, so a text's answer may vary slightly with the texts batched with it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: What --dtype accepts.
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
#: The torch dtype of the weights a model is loaded in, per precision (int8 is quantized
#: from float32 weights).
LOAD_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.float32,
}
#: The CPU flags (/proc/cpuinfo) of native bf16 arithmetic.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class ProbeSettings:
    """How a reduced precision is checked against float32 at load.

    ``texts``: most probe texts used (0 skips the probe: a named precision is trusted, and
    auto serves float32). ``min_agreement``: least share of texts whose predicted class must
    not change. ``max_probability_diff``: most any class probability may move. ``tie_margin``:
    a text whose new class float32 rated within this of its own class is a near-tie, which any
    rounding may flip: it does not count against the agreement (the probability bound still
    holds for it).
    """

    texts: int = 256
    min_agreement: float = 0.99
    max_probability_diff: float = 0.1
    tie_margin: float = 0.02

    def __post_init__(self) -> None:
        if self.texts < 0:
            raise ValueError(f"probe_texts must be 0 (no probe) or more, got {self.texts}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(
                f"probe_min_agreement must be between 0 and 1, got {self.min_agreement}"
            )
        if not 0 <= self.max_probability_diff <= 1:
            raise ValueError(
                "probe_max_probability_diff must be between 0 and 1, "
                f"got {self.max_probability_diff}"
            )
        if not 0 <= self.tie_margin <= 1:
            raise ValueError(f"probe_tie_margin must be between 0 and 1, got {self.tie_margin}")


@dataclass(frozen=True)
class ProbeResult:
    """How far a reduced precision's answers moved from float32's on the probe texts."""

    texts: int
    agreement: float  # share of texts that kept their class, near-ties aside
    max_probability_diff: float
    passed: bool
    precision: str = ""  # the reduced precision tried
    near_ties: int = 0  # texts that changed class between two float32 rated within the margin

    def describe(self) -> str:
        """The numbers, in a line."""
        ties = f" ({self.near_ties} near-ties changed)" if self.near_ties else ""
        return (
            f"{self.agreement:.2%} of {self.texts} probe texts keep their class{ties}, "
            f"probabilities move by at most {self.max_probability_diff:.3g}"
        )


def compare(
    reference: np.ndarray, candidate: np.ndarray, settings: ProbeSettings, precision: str = ""
) -> ProbeResult:
    """Judge ``candidate`` probabilities [texts, classes] against float32's ``reference``."""
    if reference.shape != candidate.shape or not len(reference):
        raise ValueError(f"probe outputs differ in shape: {reference.shape} {candidate.shape}")
    if not np.isfinite(candidate).all():  # a NaN or an overflow is never faithful
        return ProbeResult(len(reference), 0.0, float("inf"), False, precision)
    rows = np.arange(len(reference))
    ours, theirs = reference.argmax(axis=1), candidate.argmax(axis=1)
    # how much float32 preferred its class over the one now chosen (0 where unchanged)
    margin = reference[rows, ours] - reference[rows, theirs]
    changed = margin > settings.tie_margin
    agreement = 1.0 - float(changed.mean())
    diff = float(np.abs(reference - candidate).max())
    passed = agreement >= settings.min_agreement and diff <= settings.max_probability_diff
    near_ties = int(((ours != theirs) & ~changed).sum())
    return ProbeResult(len(reference), agreement, diff, passed, precision, near_ties)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 arithmetic natively (AMX or AVX-512 BF16; Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 at full speed."""
    if device.type == "cuda":  # Ampere (compute capability 8) and later; earlier ones emulate
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_native_bf16()


def choose(dtype: str, device: torch.device) -> tuple[str, str]:
    """The precision to try for ``--dtype`` on ``device``, and why."""
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(PRECISIONS)}")
    if dtype == "int8" and device.type != "cpu":
        raise ValueError("--dtype int8 (dynamic quantization) runs on the CPU only: --device cpu")
    if dtype != "auto":
        return dtype, "asked for"
    if native_bf16(device):
        return "bfloat16", f"auto: {device.type} runs bfloat16 natively"
    return "float32", f"auto: {device.type} has no native bfloat16 (AMX or AVX-512 BF16)"


def quantize_int8(model: nn.Module) -> nn.Module:
    """``model`` with every Linear layer dynamically quantized to int8 (weights per channel)."""
    try:
        from torch.ao import quantization
    except ImportError as exc:  # torch moves it to torchao
        raise ValueError(f"--dtype int8 needs torch.ao.quantization: {exc}") from exc
    with warnings.catch_warnings():  # torch marks its eager-mode quantization deprecated
        warnings.simplefilter("ignore")
        return quantization.quantize_dynamic(
            model, {nn.Linear: quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8
        )


def reduce(model: nn.Module, precision: str) -> nn.Module:
    """A float32 ``model`` converted to ``precision`` (in place where torch allows)."""
    if precision == "int8":
        return quantize_int8(model)
    return model.to(LOAD_DTYPES[precision])
