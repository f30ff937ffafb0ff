"""The one error type a component raises for bad input: its message is what the user reads."""


class DataError(ValueError):
    """Input data or parameters a pipeline step cannot work with; the message says how to fix it."""
