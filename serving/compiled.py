"""Compiled forward passes: torch.compile (inductor) with frozen weights, where it pays.

`--compile auto` compiles a model served in bfloat16 on a CPU: there the eager passes spend
much of their time between oneDNN's matrix products (layer norms, GELU, residual adds, the
attention's small kernels, and Python between ops), which inductor fuses into a few C++
kernels, and the frozen weights are packed for oneDNN once. Measured on MiniLM-L6 passes as
served (docs/benchmarks.md, AMX CPU): bfloat16 1.40x eager with padding skipped (1.12x before
the weights were really frozen); float32 0.94x, so auto leaves float32 eager. `on`
compiles whatever is served; `off` never compiles. Shapes are dynamic (one graph for every
batch size and length, plus one for single-text passes), compiled and checked at load; a
compiled model runs padded passes (the padding skip's hooks are Python-side).

Compiling needs a C++ compiler at run time (the image has one). If it fails, auto serves
eager with a WARNING and ``on`` refuses to load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: What --compile accepts.
COMPILE_MODES = ("auto", "on", "off")


def wanted(mode: str, precision: str, device: torch.device) -> bool:
    """Whether ``mode`` compiles a model served in ``precision`` on ``device``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown --compile {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return device.type == "cpu" and precision == "bfloat16"
    return mode == "on"


def compile_model(model: nn.Module) -> nn.Module:
    """``model`` behind torch.compile: inductor, shapes dynamic.

    Compiling is lazy: the first pass of each kind (one text, several) compiles it, within
    `compiling_allowed`, which freezes the weights into the graph. The graphs of models
    compiled before in this process are dropped first: they hold those models' frozen weights,
    and dynamo guards a frozen graph on its model, so each load would add graphs until its
    recompile limit (8) made every later model run eager.
    """
    torch._dynamo.reset()
    return torch.compile(model, dynamic=True)


@contextlib.contextmanager
def compiling_allowed() -> Iterator[None]:
    """Within: a pass that no compiled graph fits compiles one, weights frozen (a load's warm-up).

    Frozen, the weights are constants of the graph, and inductor packs them for oneDNN's
    matrix products ahead of time instead of reordering them in every pass. Dynamo reads
    inductor's global ``freezing`` setting while it traces; passed as a `torch.compile` option
    it reaches inductor only, and the weights stay graph inputs (torch 2.13). Measured on
    MiniLM-L6 in bfloat16, AMX CPU, one thread: 650 against 506 texts/s (1.28x).
    """
    from torch._inductor import config as inductor_config  # (importing inductor takes a while)

    with torch.compiler.set_stance("default"), inductor_config.patch(freezing=True):
        yield


def no_compiling_while_serving() -> None:
    """From now on a pass that no compiled graph fits runs eager instead of compiling.

    A compile in a forward worker would hold its requests for seconds, and dynamo and inductor
    are not thread-safe. The setting is the process's: a later load compiles its warm-up
    within `compiling_allowed`.
    """
    torch.compiler.set_stance("eager_on_recompile")
