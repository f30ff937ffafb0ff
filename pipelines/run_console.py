"""What `fineserve run --local` shows: a line per step, training progress; the rest to a log.

`kfp.local` prints every step's executor input and output as JSON and streams each step's own
output: hundreds of lines around a ten-line summary. `RunConsole` stands in for `sys.stdout`
during a run: every line goes to the log file, and the console gets a line when a step starts
and when it ends (with its state and time), the Trainer's per-epoch metrics, and, when a step
fails, the last lines of its output.
"""

from __future__ import annotations

import ast
import collections
import io
import re
import time
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
#: The last line of a Python traceback: `package.module.SomeError: message`.
_RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*): (.*)$")
#: Errors whose message is written for the user: shown alone.
_USER_ERRORS = ("DataError", "ParameterError", "RegistryError")
#: Lines of a failed step's output shown on the console (the rest are in the log).
FAILURE_TAIL = 15


class RunConsole(io.TextIOBase):
    """A text stream that writes everything to ``log`` and a digest of it to ``console``."""

    def __init__(self, log: TextIO, console: TextIO, verbose: bool = False) -> None:
        super().__init__()
        self.log, self.console, self.verbose = log, console, verbose
        self._partial = ""
        self._task: str | None = None
        self._started = 0.0
        self._recent: collections.deque[str] = collections.deque(maxlen=FAILURE_TAIL)

    def writable(self) -> bool:
        """Always: this is an output stream."""
        return True

    def write(self, text: str) -> int:
        """Log ``text`` and show the digest of each complete line."""
        self.log.write(text)
        if self.verbose:
            self.console.write(text)
            return len(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._digest(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        """Flush the log and the console."""
        self.log.flush()
        self.console.flush()

    def _show(self, line: str) -> None:
        self.console.write(line + "\n")
        self.console.flush()

    def _digest(self, line: str) -> None:
        started, finished = _STARTED.search(line), _FINISHED.search(line)
        if started:
            self._task, self._started = started.group(1), time.monotonic()
            self._recent.clear()
            self._show(f"{self._task:<10} running")
        elif finished:
            task, state = finished.groups()
            seconds = time.monotonic() - self._started
            if state != "SUCCESS":
                self._show_failure(task)
            self._show(f"{task:<10} {state} in {seconds:.1f} s")
            self._task = None
        elif self._task:
            if line.strip():
                self._recent.append(line.rstrip())
            progress = training_progress(line)
            if progress:
                self._show(f"{self._task:<10}   {progress}")

    def _show_failure(self, task: str) -> None:
        """The error a failed step raised, or its last lines when none is recognisable."""
        raised = [m for m in map(_RAISED.match, self._recent) if m]
        if not raised:
            for recent in self._recent:
                self._show(f"{task:<10} | {recent}")
            return
        kind, message = raised[-1].groups()
        self._show(
            f"{task:<10} error: {message}"
            if kind in _USER_ERRORS
            else f"{task:<10} {kind}: {message}"
        )


def training_progress(line: str) -> str | None:
    """The Trainer's per-epoch log dict as one short line; None for any other line."""
    text = line.strip()
    if not (text.startswith("{'") and text.endswith("}")):
        return None
    try:
        logged = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(logged, dict) or "epoch" not in logged:
        return None
    epoch = f"epoch {float(logged['epoch']):g}"
    if "eval_macro_f1" in logged:
        return (
            f"{epoch}: validation macro-F1 {float(logged['eval_macro_f1']):.4f}, "
            f"accuracy {float(logged.get('eval_accuracy', 'nan')):.4f}"
        )
    if "loss" in logged:
        return f"{epoch}: train loss {float(logged['loss']):.4f}"
    if "train_runtime" in logged:
        return f"trained in {float(logged['train_runtime']):.1f} s"
    return None
