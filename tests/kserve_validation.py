"""Strict validation of InferenceService objects against the kserve SDK's typed models.

The object is read with the Kubernetes client's deserializer into `kserve.V1beta1InferenceService`
and written back: a field the SDK does not know (a typo) is dropped on the way, and the round
trip reports it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace


def _kserve_api_client():
    """The Kubernetes ApiClient, resolving type names in kserve.models before its own models.

    Its deserializer looks nested types up in kubernetes.client.models only; the kserve SDK's
    own ApiClient only in kserve.models. An InferenceService needs both (V1beta1PredictorSpec
    holds V1Container), so the lookup hook of the former is widened.
    """
    import kserve.models
    from kubernetes.client import ApiClient

    class KServeAwareApiClient(ApiClient):
        def _ApiClient__deserialize(self, data, klass):  # the name-mangled private hook
            if isinstance(klass, str) and hasattr(kserve.models, klass):
                klass = getattr(kserve.models, klass)
            return super()._ApiClient__deserialize(data, klass)

    return KServeAwareApiClient()


def _round_trip_differences(original, read_back, path: str = "") -> list[str]:
    if isinstance(original, dict) and isinstance(read_back, dict):
        problems = []
        for key, value in original.items():
            where = f"{path}.{key}" if path else key
            if key not in read_back:
                problems.append(f"{where}: unknown field (the kserve SDK dropped it)")
            else:
                problems += _round_trip_differences(value, read_back[key], where)
        return problems
    if (
        isinstance(original, list)
        and isinstance(read_back, list)
        and len(original) == len(read_back)
    ):
        return [
            p
            for i, (a, b) in enumerate(zip(original, read_back, strict=True))
            for p in _round_trip_differences(a, b, f"{path}[{i}]")
        ]
    if original != read_back or type(original) is not type(read_back):
        return [f"{path}: {original!r} reads back as {read_back!r} (wrong type or shape?)"]
    return []


def validate_inference_service(obj: dict):
    """Deserialize into kserve.V1beta1InferenceService; fail on any field that does not survive."""
    client = _kserve_api_client()
    response = SimpleNamespace(data=json.dumps(obj))
    try:
        isvc = client.deserialize(response, "V1beta1InferenceService")
    except (ValueError, TypeError) as exc:  # the models' client-side validation
        raise AssertionError(f"InferenceService {obj['metadata']['name']}: {exc}") from exc
    problems = _round_trip_differences(obj, client.sanitize_for_serialization(isvc))
    assert not problems, f"InferenceService {obj['metadata']['name']}:\n  " + "\n  ".join(problems)
    return isvc
