"""Forward passes in child processes, so they share no GIL with the server's event loop.

In threads, the forward passes and the event loop (HTTP, JSON, batching) take turns at one
GIL: under load each pass waits for it, and a worker idles between passes until the loop
hands it the next one. Each child process here holds its own copy of the model, loaded with
the settings the server decided at load (precision, compiled or not, padding skip; the parent
ran the accuracy probe), and runs one planned pass at a time: token ids arrive over a pipe,
probabilities go back. The event loop waits for a reply with `add_reader`, no thread between.
A child that dies fails only the pass it held, and a new one takes its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import numpy as np

from fineserve.serving.engine import ForwardJob, TextClassifier
from fineserve.serving.precision import ProbeSettings

#: --forward-in: where forward passes run; auto is processes on a CPU, threads on a GPU.
FORWARD_IN = ("auto", "processes", "threads")
#: Longest a child may take to load and compile the model before the server gives up on it.
START_TIMEOUT_S = 600.0
#: Longest one pass may take before its child is deemed hung, killed and replaced: passes take
#: milliseconds to a second on a CPU, so only a stuck child gets near it.
PASS_TIMEOUT_S = 120.0

logger = logging.getLogger(__name__)


class ForwardProcessError(RuntimeError):
    """A forward process failed to start, died, or no forward process is running."""


def uses_processes(forward_in: str, device_type: str) -> bool:
    """Whether passes run in child processes: auto picks them on a CPU (one GPU: threads)."""
    if forward_in not in FORWARD_IN:
        raise ValueError(f"unknown forward_in {forward_in!r}; choose one of {FORWARD_IN}")
    if forward_in == "auto":
        return device_type == "cpu"
    return forward_in == "processes"


def child_settings(classifier: TextClassifier, threads: int) -> ChildSettings:
    """Settings that make a child load ``classifier`` as it was decided (probe, compile)."""
    return ChildSettings(
        model_dir=str(classifier.model_dir),
        device=str(classifier.device),
        dtype=classifier.precision,
        compile="on" if classifier.compiled else "off",
        unpad="off" if classifier.unpadded is None else "auto",
        max_batch_size=classifier.max_batch_size,
        max_batch_tokens=classifier.max_batch_tokens,
        threads=threads,
    )


@dataclass(frozen=True)
class ChildSettings:
    """How a child loads the model: the parent's decisions, so it loads what the parent does."""

    model_dir: str
    device: str
    dtype: str  # the precision the parent serves, by name (the probe ran in the parent)
    compile: str  # "on" if the parent compiled, else "off"
    unpad: str  # "auto" if the parent skips padding (the child repeats the cheap check)
    max_batch_size: int
    max_batch_tokens: int
    threads: int


def _child_main(conn: Connection, settings: dict) -> None:
    """A child: load the model, say ready, then run passes until told to stop or orphaned."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # sent to the process group, e.g. Ctrl-C:
        signal.signal(signum, signal.SIG_IGN)  # the server drains its requests, then stops us
    try:
        classifier = TextClassifier(**settings, probe=ProbeSettings(texts=0))
        classifier.predict_proba(["warm-up"])  # lazy kernel set-up, before the first request
    except BaseException as exc:  # noqa: BLE001  (the parent reports why the child failed)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", classifier.precision, classifier.compiled, classifier.unpadded is not None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if job is None:
            return
        try:
            reply = ("ok", classifier.run(job))
        except Exception as exc:  # noqa: BLE001  (this pass's callers learn why; we go on)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


class _Child:
    """One forward process and the parent's end of its pipe."""

    def __init__(self, number: int, settings: ChildSettings) -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe after torch's threads
        self.number = number
        self.overdue = False  # killed for a pass that took too long
        self.conn, child_conn = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_child_main,
            args=(child_conn, asdict(settings)),
            name=f"fineserve-forward-{number}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def wait_ready(self, settings: ChildSettings) -> None:
        """Block until the child has loaded the model as the parent did; else raise."""
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise ForwardProcessError(f"not ready after {START_TIMEOUT_S:.0f} s")
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            message = ("failed", f"it exited with code {self.process.exitcode}")
        except ForwardProcessError as exc:
            message = ("failed", str(exc))
        if message[0] != "ready":
            self.stop()
            raise ForwardProcessError(f"forward process {self.number} failed to load: {message[1]}")
        loaded = _describe(*message[1:])
        decided = _describe(settings.dtype, settings.compile == "on", settings.unpad == "auto")
        if loaded != decided:
            self.stop()
            raise ForwardProcessError(
                f"forward process {self.number} loaded the model {loaded}, "
                f"not as the server decided: {decided}"
            )

    def exited(self) -> bool:
        """Whether the process has ended (its sentinel, which works even once it is reaped)."""
        return bool(wait([self.process.sentinel], timeout=0))

    def ask_to_stop(self) -> None:
        """Tell the child to exit once its pass (if any) is done."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def stop(self, wait_s: float = 5.0) -> None:
        """Ask the child to stop; kill it if it does not within ``wait_s``."""
        self.ask_to_stop()
        self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _describe(precision: str, compiled: bool, unpadded: bool) -> str:
    return (
        f"in {precision}, {'compiled' if compiled else 'eager'}, "
        f"padding {'skipped' if unpadded else 'kept'}"
    )


class ForwardProcesses:
    """``count`` child processes that run planned forward passes; `run` awaits one's answer.

    Used from one event loop. A child that dies is replaced in the background (retried, with
    a growing pause, while starting fails); passes wait for an idle child meanwhile, unless
    none is running and the last start failed, when they fail at once with the reason.
    """

    def __init__(
        self, settings: ChildSettings, count: int, pass_timeout_s: float = PASS_TIMEOUT_S
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.settings = settings
        self.count = count
        self.pass_timeout_s = pass_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Queue[_Child | None] | None = None
        self._children: list[_Child] = []
        self._busy: dict[_Child, asyncio.Future] = {}  # child -> the future its answer resolves
        self._starting: list[_Child] = []  # replacements still loading (in their own threads)
        self._failure: str | None = None  # why the last replacement failed to start
        self._closed = False

    def start(self) -> None:
        """Start every child and wait until all have loaded the model (they load at once)."""
        children = [_Child(n, self.settings) for n in range(self.count)]
        try:
            for child in children:
                child.wait_ready(self.settings)
        except BaseException:
            for child in children:
                if child.process.is_alive():
                    child.stop(wait_s=0)
            raise
        self._children = children

    @property
    def pids(self) -> list[int]:
        """Process ids of the running children."""
        return [child.process.pid for child in self._children]

    async def run(self, job: ForwardJob) -> np.ndarray:
        """Probabilities of one planned pass, run by an idle child."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first pass (an asyncio.Queue belongs to one loop)
            self._loop, self._idle = loop, asyncio.Queue()
            for child in self._children:
                self._idle.put_nowait(child)
        while True:
            if self._closed:
                raise ForwardProcessError("the forward processes are stopping")
            if not self._children and self._failure:
                raise ForwardProcessError(f"no forward process is running: {self._failure}")
            child = await self._idle.get()
            if child is None:  # a wake-up: stopping, or the last child is gone (checked above)
                if self._closed or not self._children:
                    self._idle.put_nowait(None)  # (for the next waiter too)
                continue  # (a child came back meanwhile: the wake-up is stale, dropped)
            if child.exited():  # died while idle: no pass lost, take the next
                self._replace(child)
                continue
            try:
                child.conn.send(job)
            except OSError:
                self._replace(child)
                continue
            return await self._answer(child)

    async def _answer(self, child: _Child) -> np.ndarray:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = child.conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        self._busy[child] = readable
        overdue = loop.call_later(self.pass_timeout_s, self._kill_overdue, child)
        try:
            await readable
        except asyncio.CancelledError:  # the child still answers: take it back then
            if not self._closed:
                loop.remove_reader(fd)
                loop.add_reader(fd, self._discard_answer, child)
            raise
        finally:
            overdue.cancel()
            self._busy.pop(child, None)
        loop.remove_reader(fd)
        status, answer = self._receive(child)
        if status != "ok":
            raise ForwardProcessError(f"forward pass failed in process {child.number}: {answer}")
        return answer

    def _receive(self, child: _Child) -> tuple[str, object]:
        """The child's answer; it is idle again after (or replaced, if it died in the pass)."""
        try:
            reply = child.conn.recv()
        except (EOFError, OSError):
            self._replace(child)
            why = (
                f"ran a pass for over {self.pass_timeout_s:g} s and was killed"
                if child.overdue
                else "died during a pass"
            )
            raise ForwardProcessError(
                f"forward process {child.number} {why}; a new one is starting"
            ) from None
        self._idle.put_nowait(child)
        return reply

    def _kill_overdue(self, child: _Child) -> None:
        """A pass outlived `pass_timeout_s`: the child is hung; kill it (its pipe then ends)."""
        logger.error(
            "forward process %d (pid %s) ran a pass for over %g s; killing it",
            child.number, child.process.pid, self.pass_timeout_s,
        )  # fmt: skip
        child.overdue = True
        child.process.kill()

    def _discard_answer(self, child: _Child) -> None:
        """Read the answer of a pass nobody waits for any more, so the child takes the next."""
        self._loop.remove_reader(child.conn.fileno())
        with contextlib.suppress(ForwardProcessError):
            self._receive(child)

    def _replace(self, dead: _Child) -> None:
        """Start a child in the dead one's place, in a thread; it joins the idle ones when ready."""
        dead.process.join(0)  # reap it, if it has exited, for the exit code
        logger.error(
            "forward process %d (pid %s) exited with code %s; starting another",
            dead.number, dead.process.pid, dead.process.exitcode,
        )  # fmt: skip
        dead.conn.close()
        self._children.remove(dead)
        threading.Thread(
            target=self._start_until_ready,
            args=(dead.number,),
            daemon=True,
            name=f"fineserve-forward-{dead.number}-start",
        ).start()  # fmt: skip  (a daemon: a server shutting down does not wait for a load)

    def _start_until_ready(self, number: int) -> None:
        pause = 1.0
        while not self._closed:
            child = _Child(number, self.settings)
            self._starting.append(child)
            try:
                child.wait_ready(self.settings)
            except ForwardProcessError as exc:
                if self._closed:  # killed by close(); the loop may be gone too
                    return
                self._loop.call_soon_threadsafe(self._start_failed, str(exc))
                time.sleep(pause)
                pause = min(pause * 2, 60.0)
                continue
            finally:
                self._starting.remove(child)
            self._loop.call_soon_threadsafe(self._started, child)
            return

    def _start_failed(self, why: str) -> None:
        self._failure = why
        logger.error("a forward process could not be started (trying again): %s", why)
        if not self._children:
            self._idle.put_nowait(None)  # wake the passes waiting for a child: they fail

    def _started(self, child: _Child) -> None:
        if self._closed:
            child.stop(wait_s=0)
            return
        self._failure = None
        self._children.append(child)
        self._idle.put_nowait(child)
        logger.info("forward process %d (pid %s) is ready", child.number, child.process.pid)

    def close(self) -> None:
        """Stop every child; passes still waiting for one fail (call it on the event loop)."""
        self._closed = True
        for child, answer in list(self._busy.items()):
            if self._loop is not None:
                self._loop.remove_reader(child.conn.fileno())
            if not answer.done():
                answer.set_exception(ForwardProcessError("the forward processes are stopping"))
        if self._idle is not None:
            self._idle.put_nowait(None)
        for child in self._starting:
            child.process.kill()
        for child in self._children:
            child.ask_to_stop()  # all at once: they finish their passes side by side
        for child in self._children:
            child.stop()
        self._children = []
