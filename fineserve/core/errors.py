"""Errors whose message is what the user reads: they name the parameter, column or value."""


class DataError(ValueError):
    """Input data or parameters a pipeline step cannot work with; the message says how to fix it."""


class ParameterError(ValueError):
    """A pipeline parameter that is unknown, malformed or of the wrong type."""


class RegistryError(ValueError):
    """A registered model, version or alias that does not exist or cannot be used."""


class ClusterError(RuntimeError):
    """A Kubernetes request or rollout that failed; the message names the object and the fix."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def preview(items: list, limit: int = 10) -> str:
    """The first ``limit`` of ``items`` for a message, each `shown`, and how many more there are."""
    listed = ", ".join(shown(item, 40) for item in items[:limit])
    more = len(items) - limit
    return f"{listed}, ... ({more} more)" if more > 0 else listed
