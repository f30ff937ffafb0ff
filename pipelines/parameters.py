"""Pipeline parameters from the command line: `-p name=value` and `--params FILE.yaml`.

Names and types come from the compiled pipeline's own interface, so a parameter added to the
DAG is accepted here with no further change. Unknown names and wrong types are refused before
anything runs, naming the parameter.
"""

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fineserve.core.defaults import local_tracking_uri, offline_base_model, offline_corpus_path
from fineserve.core.errors import ParameterError

_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}

#: Defaults of the offline local run: the shipped corpus and checkpoint, sized to finish in
#: under 10 minutes on 2 CPU cores (see docs/benchmarks.md).
LOCAL_RUN_DEFAULTS: dict[str, Any] = {
    "max_train_samples": 6000,
    "max_eval_samples": 1000,
    "max_length": 128,
    "gpu_limit": 0,
}
#: Parameters describing the shipped corpus; they apply only while `dataset` is not overridden.
#: One epoch of its 6,000 rows (188 updates) keeps the default local run within 5 minutes on 2
#: cores; a user's own data gets the recipe's epochs (`min_updates`).
OFFLINE_DATA_DEFAULTS: dict[str, Any] = {
    "dataset_config": "",
    "encoding": "latin-1",
    "text_column": "text",
    "label_column": "sentiment",
    "epochs": 1.0,
}


def parameter_types(pipeline) -> dict[str, tuple[type, Any]]:
    """Each pipeline parameter's Python type and default, from the pipeline's interface."""
    return {
        name: (_TYPES[spec.type], spec.default)
        for name, spec in pipeline.component_spec.inputs.items()
    }


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    wanted = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}.get(
        kind, "a string"
    )
    raise ParameterError(f"parameter {name!r} expects {wanted}, got {value!r}")


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """`name=value` strings into a dict (the value may itself contain `=`)."""
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"expected name=value, got {pair!r}")
        result[name.strip()] = value
    return result


def load_params_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of parameter names to values."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ParameterError(f"cannot read parameter file {str(path)!r}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ParameterError(f"parameter file {str(path)!r} is not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ParameterError(
            f"parameter file {str(path)!r} must hold a mapping of name: value, "
            f"not a {type(loaded).__name__}"
        )
    return loaded


#: Values a parameter may take, checked before anything runs (the steps check them again on
#: a cluster, where runs do not pass through this command line).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 0, "0 (the recipe's choice) or more"),
    "learning_rate": (lambda v: v >= 0, "0 (the recipe's choice) or more"),
    "min_updates": (lambda v: v >= 0, "0 or more"),
    "validate_every": (lambda v: v >= 0, "0 (the recipe's choice) or more"),
    "class_weighting": (lambda v: v in ("balanced", "none"), "balanced or none"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "from 0 up to (not including) 1"),
    "max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more"),
    "early_stopping_patience": (lambda v: v >= 0, "0 (off) or more"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (no limit) or at least 1"),
    "max_length": (lambda v: 8 <= v <= 8192, "from 8 to 8192 tokens"),
    "validation_fraction": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "test_fraction": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "max_train_samples": (lambda v: v >= 0, "0 (all rows) or more"),
    "max_eval_samples": (lambda v: v >= 0, "0 (all rows) or more"),
    "n_bootstrap": (lambda v: v >= 1, "at least 1"),
    "gpu_limit": (lambda v: v >= 0, "0 or more"),
    "seed": (lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1"),
    "canary_percent": (lambda v: 0 <= v <= 100, "from 0 to 100"),
    "min_replicas": (lambda v: v >= 0, "0 (scale to zero, Serverless mode) or more"),
    "max_replicas": (lambda v: v >= 1, "at least 1"),
    "scale_target": (lambda v: v >= 0, "0 (the mode's default) or more"),
    "container_concurrency": (lambda v: v >= 0, "0 (no limit) or more"),
    "predictor_gpus": (lambda v: v >= 0, "0 or more"),
    "ready_timeout": (lambda v: v >= 1, "at least 1 second"),
    "deployment_mode": (
        lambda v: v.lower() in ("serverless", "knative", "standard", "rawdeployment"),
        "Serverless (Knative) or Standard (RawDeployment)",
    ),
}


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be a finite number, got {value!r}")
    rule = RULES.get(name)
    if rule and not rule[0](value):
        raise ParameterError(f"parameter {name!r} must be {rule[1]}, got {value!r}")


def validate(values: Mapping[str, Any], types: Mapping[str, tuple[type, Any]]) -> dict[str, Any]:
    """Check every name exists, convert every value to its type, and check its range."""
    checked = {}
    for name, value in values.items():
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"unknown parameter {name!r}{hint} (known: {', '.join(sorted(types))})"
            )
        checked[name] = _coerce(name, value, types[name][0])
        _check_value(name, checked[name])
    return checked


def local_run_arguments(
    pipeline, user_values: Mapping[str, Any], root: str | Path = "."
) -> dict[str, Any]:
    """Every argument of a local run: pipeline defaults, offline defaults, the user's values."""
    types = parameter_types(pipeline)
    user = validate(user_values, types)
    # MLflow: -p tracking_uri, else $MLFLOW_TRACKING_URI (its server keeps the artifacts),
    # else a local store in ``root``: the rule `fineserve serve --model-uri` follows too
    server = os.environ.get("MLFLOW_TRACKING_URI")
    arguments: dict[str, Any] = {
        **{name: default for name, (_, default) in types.items()},
        "base_model": offline_base_model(),
        "tracking_uri": server or local_tracking_uri(root),
        "artifact_location": "" if server else str(Path(root).resolve() / "mlartifacts"),
        **LOCAL_RUN_DEFAULTS,
    }
    if "dataset" not in user:
        arguments.update(dataset=offline_corpus_path(), **OFFLINE_DATA_DEFAULTS)
    arguments.update(user)
    return validate(arguments, types)
