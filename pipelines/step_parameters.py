"""Pipeline parameters made from the steps' own, so that each parameter is defined once.

A step's parameters (name, type, default, docstring line) are defined by its component function
alone. The pipeline exposes them under the same name (or a name given in `Step.renamed`), with
the same type, default and description, unless the pipeline sets a value itself
(`Step.hidden`) or gives another default. A name several steps share (`seed`, `base_model`)
is one pipeline parameter, fed to each of them; they must agree on its type and default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Python types KFP accepts for pipeline parameters.
_PARAMETER_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class StepParameter:
    """One parameter of a step as the pipeline exposes it."""

    name: str  # the pipeline's name for it
    step_name: str  # the step's own name for it
    parameter: inspect.Parameter
    description: str


@dataclass(frozen=True)
class Step:
    """A component as a source of pipeline parameters.

    Attributes:
        component: The `@component` function of the step.
        renamed: Step parameter name → pipeline parameter name, where the two differ.
        hidden: Step parameters the pipeline does not expose (it sets them, or keeps the
            step's default).
    """

    component: Any
    renamed: Mapping[str, str] = field(default_factory=dict)
    hidden: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The step's component name."""
        return self.component.name

    def parameters(self) -> list[StepParameter]:
        """The step's exposed parameters, in signature order."""
        specs = self.component.component_spec.inputs or {}
        signature = inspect.signature(self.component.python_func)
        unknown = set(self.hidden) | set(self.renamed)
        unknown -= set(signature.parameters)
        if unknown:
            raise TypeError(f"step {self.name!r} has no parameters {sorted(unknown)}")
        return [
            StepParameter(
                name=self.renamed.get(name, name),
                step_name=name,
                parameter=parameter,
                description=specs[name].description or "",
            )
            for name, parameter in signature.parameters.items()
            if parameter.annotation in _PARAMETER_TYPES and name not in self.hidden
        ]

    def arguments(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """This step's arguments, taken from the pipeline's ``values``."""
        return {p.step_name: values[p.name] for p in self.parameters()}


def pipeline_parameters(
    steps: list[Step], *, defaults: Mapping[str, Any], extra: Callable
) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """The pipeline's parameters and their descriptions, from ``steps`` and ``extra``.

    ``defaults`` replace step defaults (a cluster default for a step parameter the step leaves
    required, say). ``extra`` is a function whose signature and docstring define the
    parameters that belong to the pipeline alone (the train step's GPU count, say).
    """
    merged: dict[str, inspect.Parameter] = {}
    descriptions: dict[str, list[tuple[str, str]]] = {}
    sources: list[tuple[str, inspect.Parameter, str, str]] = []
    for step in steps:
        for p in step.parameters():
            sources.append((p.name, p.parameter, p.description, step.name))
    extra_docs = _docstring_args(extra)
    for name, parameter in inspect.signature(extra).parameters.items():
        sources.append((name, parameter, extra_docs.get(name, ""), "pipeline"))

    for name, parameter, description, owner in sources:
        default = defaults.get(name, parameter.default)
        exposed = inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=parameter.annotation
        )
        if name in merged and (merged[name].annotation, merged[name].default) != (
            exposed.annotation,
            exposed.default,
        ):
            raise TypeError(
                f"pipeline parameter {name!r}: steps disagree on its type or default "
                f"({merged[name].annotation.__name__} = {merged[name].default!r} vs "
                f"{exposed.annotation.__name__} = {exposed.default!r} in {owner!r})"
            )
        merged.setdefault(name, exposed)
        if not any(text == description for text, _ in descriptions.get(name, [])):
            descriptions.setdefault(name, []).append((description, owner))
    return list(merged.values()), {
        name: " ".join(text if len(found) == 1 else f"{owner}: {text}" for text, owner in found)
        for name, found in descriptions.items()
    }


def _docstring_args(func: Callable) -> dict[str, str]:
    import docstring_parser

    return {
        p.arg_name: p.description or "" for p in docstring_parser.parse(func.__doc__ or "").params
    }


def pipeline_function(
    name: str,
    body: Callable[[dict[str, Any]], Any],
    parameters: list[inspect.Parameter],
    descriptions: Mapping[str, str],
    summary: str,
    returns: Any,
    returns_doc: Mapping[str, str],
) -> Callable:
    """A function KFP's `dsl.pipeline` compiles: ``parameters`` in, ``body(values)`` run.

    KFP reads a pipeline's inputs from its signature and their descriptions from its
    docstring's Args, and calls it with one positional argument per input.
    """
    signature = inspect.Signature(parameters, return_annotation=returns)

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        values = dict(zip(signature.parameters, args, strict=False))
        values.update(kwargs)
        for parameter in parameters:
            values.setdefault(parameter.name, parameter.default)
        return body(values)

    def section(title: str, entries: Mapping[str, str]) -> str:
        lines = (f"    {key}: {' '.join(text.split())}" for key, text in entries.items())
        return f"{title}:\n" + "\n".join(lines)

    args = {p.name: descriptions.get(p.name, "") for p in parameters}
    pipeline.__signature__ = signature  # type: ignore[attr-defined]
    pipeline.__name__ = pipeline.__qualname__ = name
    pipeline.__doc__ = (
        f"{summary}\n\n{section('Args', args)}\n\n{section('Returns', returns_doc)}\n"
    )
    return pipeline
