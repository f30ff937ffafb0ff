"""Errors whose message is what the user reads: they name the parameter, column or value."""


class DataError(ValueError):
    """Input data or parameters a pipeline step cannot work with; the message says how to fix it."""


class ParameterError(ValueError):
    """A pipeline parameter that is unknown, malformed or of the wrong type."""


class RegistryError(ValueError):
    """A registered model, version or alias that does not exist or cannot be used."""


class ClusterError(RuntimeError):
    """A Kubernetes request or rollout that failed; the message names the object and the fix."""
