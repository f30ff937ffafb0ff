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

from fineserve.core import inference_service as isvc
from fineserve.core.defaults import local_tracking_uri, offline_base_model, offline_corpus_path
from fineserve.core.errors import ParameterError, shown
from fineserve.pipelines import cluster_names as names
from fineserve.pipelines.kubeflow_config import SECTION

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
    raise ParameterError(f"parameter {name!r} expects {wanted}, got {shown(value)}")


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """`name=value` strings into a dict (the value may itself contain `=`)."""
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"expected name=value, got {pair!r}")
        result[name.strip()] = value
    return result


#: How deep a params file may nest: its `kubeflow:` section goes four levels down (kubeflow >
#: secrets > one secret > its keys).
MAX_NESTING = 8
_STR_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


def load_params_file(path: str | Path) -> dict[str, Any]:
    """A params file: a YAML (or JSON) mapping of parameter names to values.

    The file is UTF-8; its keys are names, each given once; a parameter's value is a scalar
    (the `kubeflow:` section is a mapping); it nests at most `MAX_NESTING` levels. Anything
    else is a ParameterError naming the file, the line and the key.
    """
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ParameterError(f"cannot read parameter file {where!r}: {err.strerror}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ParameterError(
            f"parameter file {where!r} is not UTF-8 text (byte {raw[err.start]:#04x} on line "
            f"{line}); save it as UTF-8"
        ) from err
    try:
        _check_nesting(text, where)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}
            _check_document(node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ParameterError(f"parameter file {where!r} is not valid YAML: {err}") from err


def _check_nesting(text: str, where: str) -> None:
    """Refuse a document nested deeper than `MAX_NESTING` (read as events: no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise ParameterError(
                    f"parameter file {where!r}, line {event.start_mark.line + 1}: nested more "
                    f"than {MAX_NESTING} levels deep; a params file maps names to values "
                    f"(and its {SECTION}: section holds the cluster settings)"
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return node.tag.rsplit(":", 1)[-1]  # str, int, float, bool, null, timestamp


def _check_document(node: yaml.Node, where: str) -> None:
    """A flat mapping of names to scalars (and the kubeflow: mapping); keys are unique text."""
    if not isinstance(node, yaml.MappingNode):
        raise ParameterError(
            f"parameter file {where!r} must hold a mapping of name: value, not a {_kind(node)}"
        )
    _check_keys(node, where, seen=set())
    for key, value in node.value:
        if key.tag == _MERGE_TAG or key.value == SECTION:
            continue
        if not isinstance(value, yaml.ScalarNode):
            raise ParameterError(
                f"parameter file {where!r}, line {value.start_mark.line + 1}: {key.value!r} "
                f"holds a {_kind(value)}; a parameter's value is one string, number or boolean"
            )


def _check_keys(node: yaml.Node, where: str, seen: set[int]) -> None:
    """Every mapping key under ``node`` is text and given once (aliases are visited once)."""
    if id(node) in seen or isinstance(node, yaml.ScalarNode):
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item, where, seen)
        return
    lines: dict[str, int] = {}
    for key, value in node.value:
        line = key.start_mark.line + 1
        if key.tag == _MERGE_TAG:
            pass
        elif not isinstance(key, yaml.ScalarNode) or key.tag != _STR_TAG:
            text = key.value if isinstance(key, yaml.ScalarNode) else "..."
            raise ParameterError(
                f"parameter file {where!r}, line {line}: key {shown(text)} is not a name "
                f"(YAML reads it as {_kind(key)}); keys are names such as epochs (quote one "
                "that YAML reads as a number, boolean or null)"
            )
        elif key.value in lines:
            raise ParameterError(
                f"parameter file {where!r}, line {line}: key {shown(key.value)} is "
                f"given twice (first on line {lines[key.value]})"
            )
        else:
            lines[key.value] = line
        _check_keys(value, where, seen)


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
    "min_class_rows": (lambda v: v >= 1, "at least 1 (1: no class is rare)"),
    "rare_classes": (lambda v: v in ("keep", "drop", "fail"), "keep, drop or fail"),
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


def _optional(check: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """``check`` for a name that may also be empty (the default: "the pod's own", say)."""
    return lambda value: check(value) if value else None


#: String parameters that the cluster or MLflow would refuse: each check says what is wrong
#: (see `cluster_names` for where each rule comes from).
NAME_RULES: dict[str, Callable[[str], str | None]] = {
    "model_name": names.registered_model_name_problem,
    "experiment_name": names.experiment_name_problem,
    "inference_service": names.inference_service_problem,
    "namespace": _optional(names.dns1123_label_problem),
    "storage_service_account": _optional(names.dns1123_subdomain_problem),
    "predictor_cpu": names.quantity_problem,
    "predictor_cpu_limit": names.quantity_problem,
    "predictor_memory": names.quantity_problem,
    "predictor_memory_limit": names.quantity_problem,
}


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be a finite number, got {value!r}")
    rule = RULES.get(name)
    if rule and not rule[0](value):
        raise ParameterError(f"parameter {name!r} must be {rule[1]}, got {shown(value)}")
    problem = NAME_RULES[name](value) if name in NAME_RULES else None
    if problem:
        raise ParameterError(f"parameter {name!r} {problem}, got {shown(value)}")


def check_values(
    values: Mapping[str, Any], types: Mapping[str, tuple[type, Any]]
) -> dict[str, Any]:
    """Check every name exists, convert every value to its type, and check each on its own."""
    checked = {}
    for name, value in values.items():
        if not isinstance(name, str) or name not in types:
            close = difflib.get_close_matches(str(name), types, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"unknown parameter {shown(name)}{hint} (known: {', '.join(sorted(types))})"
            )
        checked[name] = _coerce(name, value, types[name][0])
        _check_value(name, checked[name])
    return checked


def check_combination(values: Mapping[str, Any]) -> None:
    """Refuse parameters that are fine alone but not together (``values``: all of them)."""
    if values["text_column"] == values["label_column"]:
        raise ParameterError(
            f"text_column and label_column are both {shown(values['text_column'])}: "
            "the text and the label must be two different columns"
        )
    mode = isvc.normalize_mode(values["deployment_mode"])
    service = values["inference_service"]
    problem = names.inference_service_problem(service, standard_mode=mode == isvc.STANDARD)
    if problem:
        raise ParameterError(f"parameter 'inference_service' {problem}, got {shown(service)}")
    isvc.check_settings(
        mode,
        isvc.PredictorSettings(
            image="",
            storage_uri="",
            model_version="",
            cpu_request=values["predictor_cpu"],
            cpu_limit=values["predictor_cpu_limit"],
            memory_request=values["predictor_memory"],
            memory_limit=values["predictor_memory_limit"],
            gpus=values["predictor_gpus"],
            min_replicas=values["min_replicas"],
            max_replicas=values["max_replicas"],
            scale_metric=values["scale_metric"],
            scale_target=values["scale_target"],
            container_concurrency=values["container_concurrency"],
        ),
    )


def validate(values: Mapping[str, Any], types: Mapping[str, tuple[type, Any]]) -> dict[str, Any]:
    """`check_values`, then `check_combination` of them over the defaults; the checked values."""
    checked = check_values(values, types)
    check_combination({**{name: default for name, (_, default) in types.items()}, **checked})
    return checked


def local_run_arguments(
    pipeline, user_values: Mapping[str, Any], root: str | Path = "."
) -> dict[str, Any]:
    """Every argument of a local run: pipeline defaults, offline defaults, the user's values."""
    types = parameter_types(pipeline)
    user = check_values(user_values, types)  # together: once the local defaults are in
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
