"""Turn v1/v2 requests into a list of texts, and probabilities into v1/v2 responses."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

INPUT_NAME = "text"
OUTPUT_NAMES = ("label", "label_id", "probabilities")


class NotServed(ModelNotFound):
    """A model version or an endpoint this predictor does not serve: 404, saying what it does."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def check_version(model_name: str, requested: str | None, served: str) -> None:
    """A request naming a model version must name the one served (HTTP and gRPC alike)."""
    if requested and requested != served:
        raise NotServed(
            f"model {model_name!r} has no version {requested!r} here: this predictor serves "
            f"version {served!r}; leave the version out or ask for {served!r}"
        )


def requested_outputs(request: InferRequest) -> list[str]:
    """The output names a v2 request asks for (all when it names none); unknown ones refused."""
    names = [output.name for output in request.request_outputs or []]
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise InvalidInput(
            f"unknown requested output(s) {unknown}; this model's outputs are {list(OUTPUT_NAMES)}"
        )
    return names or list(OUTPUT_NAMES)


def input_metadata() -> list[dict]:
    """The one input tensor, as listed by the v2 model metadata endpoint."""
    return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]


def output_metadata(num_labels: int) -> list[dict]:
    """The output tensors, as listed by the v2 model metadata endpoint."""
    return [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "label_id", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_labels]},
    ]


def check_texts(items: list[Any], where: str, max_texts: int) -> list[str]:
    """Validate a list of texts: 1..max_texts items, each a string (or UTF-8 bytes)."""
    if not items:
        raise InvalidInput(f"{where} is empty; send at least one text")
    if len(items) > max_texts:
        raise InvalidInput(
            f"{where} holds {len(items)} texts; at most {max_texts} are allowed per request"
        )
    texts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"{where} item {i} is not valid UTF-8: {exc.reason}") from None
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInput(f"{where} item {i} is not valid UTF-8: {exc.reason}") from None
        else:
            raise InvalidInput(
                f"{where} item {i} is {type(item).__name__} ({_short(item)}); expected a string"
            )
        texts.append(item)
    return texts


def texts_from_v2(request: InferRequest, max_texts: int) -> list[str]:
    """The texts of a v2 request: exactly one BYTES tensor of shape [N] (or [N, 1])."""
    if len(request.inputs) != 1:
        names = [tensor.name for tensor in request.inputs]
        raise InvalidInput(
            f"expected exactly one input tensor (BYTES, shape [N], named '{INPUT_NAME}'), "
            f"got {len(names)}: {names}"
        )
    tensor = request.inputs[0]
    where = f"input '{tensor.name}'"
    if tensor.name != INPUT_NAME:
        raise InvalidInput(
            f"{where} is unknown: this model takes one BYTES input named '{INPUT_NAME}'"
        )
    if tensor.datatype != "BYTES":
        raise InvalidInput(
            f"{where} has datatype {tensor.datatype}; expected BYTES (one string per text)"
        )
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where} has shape {shape}; expected [N] (or [N, 1]) for N texts")
    items = _tensor_items(tensor, where)
    if shape[0] != len(items):
        raise InvalidInput(f"{where} has shape {shape} but holds {len(items)} items")
    return check_texts(items, where, max_texts)


def _tensor_items(tensor: InferInput, where: str) -> list[Any]:
    data = tensor.data
    if isinstance(data, np.ndarray):
        return data.ravel().tolist()
    if data:
        return list(data)
    try:  # gRPC raw_input_contents: length-prefixed bytes
        return tensor.as_numpy().ravel().tolist()
    except ValueError:  # no raw contents either: the reshape to a non-empty shape failed
        return []
    except struct.error:
        raise InvalidInput(f"{where}: raw contents are not a valid BYTES tensor") from None


def texts_from_v1(payload: Any, max_texts: int, json_body: bool = False) -> list[str]:
    """The texts of a v1 `:predict` body, ``{"instances": ["text", ...]}``.

    ``json_body``: the body came as JSON, so a string ``payload`` is a JSON string.
    """
    if isinstance(payload, str) and json_body:
        raise InvalidInput(
            'request body must be a JSON object {"instances": ["text", ...]}, not a JSON string'
        )
    if isinstance(payload, (bytes, str)):  # sent without a JSON Content-Type
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        kind = "a JSON " + {list: "array", str: "string"}.get(type(payload), type(payload).__name__)
        raise InvalidInput(
            f'request body must be a JSON object {{"instances": ["text", ...]}}, not {kind}'
        )
    if "instances" not in payload:
        raise InvalidInput('missing "instances": expected {"instances": ["text", ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f'"instances" must be a list of strings, got {type(instances).__name__}')
    return check_texts(instances, '"instances"', max_texts)


def v2_response(
    request: InferRequest,
    probs: np.ndarray,
    labels: list[str],
    model_name: str,
    model_version: str,
) -> InferResponse:
    """`label`, `label_id` and `probabilities`, or those the request asked for; its id echoed."""
    wanted = requested_outputs(request)
    label_ids = probs.argmax(axis=1).tolist()
    # plain lists: KServe's to_grpc cannot take numpy data when it answers with raw contents
    outputs = [
        InferOutput("label", [len(probs)], "BYTES", [labels[i] for i in label_ids]),
        InferOutput("label_id", [len(probs)], "INT64", label_ids),
        InferOutput(
            "probabilities",
            list(probs.shape),
            "FP32",
            probs.ravel().tolist(),
            parameters={"labels": json.dumps(labels)},
        ),
    ]
    outputs = [output for output in outputs if output.name in wanted]
    return InferResponse(
        response_id=request.id or str(uuid.uuid4()),
        model_name=model_name,
        model_version=model_version,
        infer_outputs=outputs,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )


def v1_response(probs: np.ndarray, labels: list[str]) -> dict:
    """``{"predictions": [{"label", "label_id", "probabilities": {label: p}}]}``."""
    return {
        "predictions": [
            {
                "label": labels[best],
                "label_id": best,
                "probabilities": dict(zip(labels, row, strict=True)),
            }
            for best, row in zip(probs.argmax(axis=1).tolist(), probs.tolist(), strict=True)
        ]
    }


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
