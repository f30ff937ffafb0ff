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
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
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


#: prctl(2) option: the signal the kernel sends this process when its parent thread ends.
_PR_SET_PDEATHSIG = 1


def _child_entry(conn: Connection, settings: dict, parent_pid: int) -> None:
    """A child's first steps: die with the server, then load and serve (`_child_main`)."""
    _die_with_parent(parent_pid)
    _child_main(conn, settings)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the server's thread that started it ends.

    A server killed outright (SIGKILL, the OOM killer) runs no clean-up, and a child busy
    loading or stuck in a pass would outlive it, holding a copy of the model. Linux only
    (prctl(2), PR_SET_PDEATHSIG); elsewhere a child ends when it finds its pipe closed.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    signum = ctypes.c_ulong(signal.SIGKILL)
    if libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), signum, *[ctypes.c_ulong(0)] * 3) != 0:
        return  # (not expected on Linux; the pipe still ends the child with the server)
    if os.getppid() != parent_pid:  # the server died before the call above: nobody to serve
        os._exit(1)


class NoForwardProcess(ForwardProcessError):
    """No forward process can take a pass: none is running, or they are stopping."""


class _Child:
    """One forward process and the parent's end of its pipe."""

    def __init__(self, number: int, settings: ChildSettings) -> None:
        context = multiprocessing.get_context("spawn")  # fork is unsafe after torch's threads
        self.number = number
        self.overdue = False  # killed for a pass (or a start) that took too long
        self.busy = False  # holds a pass, or the answer of a cancelled one is still due
        self.exit_seen = False  # its process was seen to end while it was busy
        self.retired = False  # found dead (or killed) and taken out of service
        self.start_timer: asyncio.TimerHandle | None = None  # gives up on a slow start
        self.conn, child_conn = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_child_entry,
            args=(child_conn, asdict(settings), os.getpid()),
            name=f"fineserve-forward-{number}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def wait_ready(self, settings: ChildSettings) -> None:
        """Block until the child has loaded the model as the parent did; else stop it, raise."""
        try:
            arrived = self.conn.poll(START_TIMEOUT_S)
        except OSError:
            arrived = True  # (take_ready reads why)
        if not arrived:
            self.overdue = True
        try:
            self.take_ready(settings)
        except ForwardProcessError:
            self.stop()
            raise

    def take_ready(self, settings: ChildSettings) -> None:
        """Read the child's first message (it has sent one, or ended); raise unless ready."""
        if self.overdue:
            message = ("failed", f"not ready after {START_TIMEOUT_S:.0f} s")
        else:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(1)  # (its pipe ended: it has exited or is about to)
                message = ("failed", f"it exited with code {self.process.exitcode}")
        if message[0] != "ready":
            raise ForwardProcessError(f"forward process {self.number} failed to load: {message[1]}")
        loaded = _describe(*message[1:])
        decided = _describe(settings.dtype, settings.compile == "on", settings.unpad == "auto")
        if loaded != decided:
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

    Used from one event loop (`watch` attaches it; the first `run` does too). The loop
    watches each child's process sentinel, so a child that dies, idle or not, is taken out of
    service at once and a new one started in its place, from the loop's thread (retried, with
    a growing pause, while starting fails). `ready` is true while at least one child runs;
    while none does, passes fail at once with `NoForwardProcess` instead of waiting.
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
        self._children: list[_Child] = []  # running and ready: idle or in a pass
        self._busy: dict[_Child, asyncio.Future] = {}  # child -> the future its answer resolves
        self._starting: list[_Child] = []  # replacements still loading
        self._retries: dict[int, asyncio.TimerHandle] = {}  # child number -> its next start
        self._pauses: dict[int, float] = {}  # child number -> pause after its next failed start
        self._failure: str | None = None  # why the last replacement failed to start
        self._closed = False

    def start(self) -> None:
        """Start every child and wait until all have loaded the model (they load at once).

        Call it from the thread that will run the event loop: the kernel ends the children
        when the thread that started them ends.
        """
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

    @property
    def ready(self) -> bool:
        """Whether a child can take a pass now (attributes only: cheap enough for every call)."""
        return bool(self._children) and not self._closed

    @property
    def unavailable_reason(self) -> str | None:
        """Why no pass can run now; None while one can."""
        if self._closed:
            return "the forward processes are stopping"
        if self._children:
            return None
        starting = f"{len(self._starting) + len(self._retries)} starting"
        if self._failure:
            starting += f"; the last start failed: {self._failure}"
        return f"no forward process is running ({starting})"

    def watch(self) -> None:
        """Watch the children from the running event loop (call it on the loop, at start-up)."""
        self._attach(asyncio.get_running_loop())

    async def run(self, job: ForwardJob) -> np.ndarray:
        """Probabilities of one planned pass, run by an idle child."""
        self._attach(asyncio.get_running_loop())
        while True:
            if not self.ready:
                raise NoForwardProcess(self.unavailable_reason)
            child = await self._idle.get()
            if child is None:  # a wake-up: stopping, or the last child is gone (checked above)
                if not self.ready:
                    self._idle.put_nowait(None)  # (for the next waiter too)
                continue  # (a child came back meanwhile: the wake-up is stale, dropped)
            if child.retired:  # died while idle, and already replaced
                continue
            if child.exited():  # died while idle, not yet seen by the loop: no pass lost
                self._replace(child)
                continue
            try:
                child.conn.send(job)
            except OSError:
                self._replace(child)
                continue
            child.busy = True
            return await self._answer(child)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve passes from ``loop`` and watch the children from it (a no-op if it does)."""
        if self._loop is loop:
            return
        old, self._loop, self._idle = self._loop, loop, asyncio.Queue()
        if old is not None and not old.is_closed():
            for child in (*self._children, *self._starting):
                old.remove_reader(child.process.sentinel)
                old.remove_reader(child.conn.fileno())
        for child in list(self._children):
            if child.busy:  # an answer due on a loop that is gone: it would answer a new pass
                child.process.kill()
                self._replace(child)
            else:
                self._watch(child)
                self._idle.put_nowait(child)
        for child in self._starting:
            self._await_start(child)
        for number in list(self._retries):
            self._retries[number].cancel()
            self._retries[number] = loop.call_soon(self._start, number)

    def _watch(self, child: _Child) -> None:
        """Have the loop call `_exited` as soon as ``child``'s process ends."""
        self._loop.add_reader(child.process.sentinel, self._exited, child)

    def _exited(self, child: _Child) -> None:
        self._loop.remove_reader(child.process.sentinel)
        if child.retired:
            return
        if child.busy:  # its pipe ends too: the pass learns it, and `_receive` replaces it
            child.exit_seen = True
            return
        self._replace(child)

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
        child.busy = False
        if child.exit_seen:  # it answered, then died
            self._replace(child)
        else:
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
        """Take a dead (or killed) child out of service and start another in its place."""
        if dead.retired:
            return
        dead.retired = True
        self._loop.remove_reader(dead.process.sentinel)
        self._loop.remove_reader(dead.conn.fileno())
        if dead.process.is_alive():  # e.g. its pipe broke: no child runs unwatched
            dead.process.kill()
        dead.process.join(1)  # reap it, for the exit code
        logger.error(
            "forward process %d (pid %s) exited with code %s; starting another",
            dead.number, dead.process.pid, dead.process.exitcode,
        )  # fmt: skip
        dead.conn.close()
        self._children.remove(dead)
        if not self._children:
            logger.error("no forward process is running: not ready until one has started")
            self._idle.put_nowait(None)  # wake the passes waiting for a child: they fail now
        self._start(dead.number)

    def _start(self, number: int) -> None:
        """Start child ``number`` from the loop's thread; `_start_reported` takes its answer."""
        self._retries.pop(number, None)
        if self._closed:
            return
        try:
            child = _Child(number, self.settings)
        except OSError as exc:  # no memory or process slot to start one
            self._start_failed(number, f"forward process {number} could not be started: {exc}")
            return
        self._starting.append(child)
        self._await_start(child)

    def _await_start(self, child: _Child) -> None:
        if child.start_timer is not None:
            child.start_timer.cancel()
        child.start_timer = self._loop.call_later(START_TIMEOUT_S, self._start_overdue, child)
        self._loop.add_reader(child.conn.fileno(), self._start_reported, child)

    def _start_overdue(self, child: _Child) -> None:
        child.overdue = True
        child.process.kill()  # its pipe ends: `_start_reported` says why

    def _start_reported(self, child: _Child) -> None:
        """A starting child said it is ready, or failed (or died): serve with it, or retry."""
        self._loop.remove_reader(child.conn.fileno())
        child.start_timer.cancel()
        self._starting.remove(child)
        try:
            child.take_ready(self.settings)
        except ForwardProcessError as exc:
            child.process.kill()  # (it has failed; a killed one is reaped by the next start)
            child.conn.close()
            self._start_failed(child.number, str(exc))
            return
        self._pauses.pop(child.number, None)
        self._failure = None
        self._children.append(child)
        self._watch(child)
        self._idle.put_nowait(child)
        logger.info("forward process %d (pid %s) is ready", child.number, child.process.pid)

    def _start_failed(self, number: int, why: str) -> None:
        self._failure = why
        pause = self._pauses.get(number, 1.0)
        self._pauses[number] = min(pause * 2, 60.0)
        logger.error(
            "a forward process could not be started (trying again in %g s): %s", pause, why
        )
        self._retries[number] = self._loop.call_later(pause, self._start, number)

    def close(self) -> None:
        """Stop every child; passes still waiting for one fail (call it on the event loop)."""
        self._closed = True
        loop = self._loop if self._loop is not None and not self._loop.is_closed() else None
        for retry in self._retries.values():
            retry.cancel()
        self._retries.clear()
        for child in self._starting:
            if loop is not None:
                loop.remove_reader(child.conn.fileno())
                child.start_timer.cancel()
            child.process.kill()
            child.process.join(1)
            child.conn.close()
        self._starting = []
        for child, answer in list(self._busy.items()):
            if loop is not None:
                loop.remove_reader(child.conn.fileno())
                if not answer.done():
                    answer.set_exception(NoForwardProcess("the forward processes are stopping"))
        for child in self._children:
            if loop is not None:
                loop.remove_reader(child.process.sentinel)
            child.ask_to_stop()  # all at once: they finish their passes side by side
        if self._idle is not None and loop is not None:
            self._idle.put_nowait(None)
        for child in self._children:
            child.stop()
        self._children = []
