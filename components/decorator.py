"""The `@component` decorator every fineserve step uses, and a way to call a step in-process."""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from kfp import dsl

from fineserve.core.defaults import component_image


def component(func: Callable) -> Callable:
    """A lightweight component on the project image, whose body imports the project.

    Inside a running step, KFP sets `_KFP_RUNTIME=true` and loads only its runtime (no
    `dsl.component`); there the module is imported for its plain functions, so the function is
    returned as it is. The image has kfp installed, so no `pip install kfp` at step start.
    """
    if os.environ.get("_KFP_RUNTIME") == "true":
        return func
    return dsl.component(base_image=component_image(), install_kfp_package=False)(func)


@dataclass
class StepResult:
    """What a step called in-process returned, and its artifacts (metadata, metrics) by name."""

    outputs: Any
    artifacts: dict[str, dsl.Artifact]


def call_component(step: Any, /, **arguments: Any) -> StepResult:
    """Run a step's function in this process, as KFP's executor would.

    Pass a path (str or Path) for each artifact argument, input or output: it becomes an
    artifact of the annotated type at that path. Metrics outputs that are not passed live in
    memory. Other arguments are the step's parameters; omitted ones take their defaults.
    """
    func = getattr(step, "python_func", step)
    artifacts: dict[str, dsl.Artifact] = {}
    for name, parameter in inspect.signature(func).parameters.items():
        kind = _artifact_type(parameter.annotation)
        if kind is None:
            continue
        if name in arguments:
            artifacts[name] = kind(name=name, uri=str(arguments[name]), metadata={})
        elif issubclass(kind, (dsl.Metrics, dsl.ClassificationMetrics)):
            artifacts[name] = kind(name=name, uri="", metadata={})
        else:
            raise TypeError(f"{func.__name__}: give a path for its artifact {name!r}")
    outputs = func(**{**arguments, **artifacts})
    return StepResult(outputs, artifacts)


def _artifact_type(annotation: Any) -> type | None:
    """The artifact class of an `Input[...]`/`Output[...]` annotation, else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, dsl.Artifact):
            return candidate
    return None
