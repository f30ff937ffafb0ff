"""Dynamic batching: coalesce concurrent requests, run the forward passes off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

#: Told about every batch: (number of texts, seconds each request waited in the queue).
BatchObserver = Callable[[int, list[float]], None]


class Job(Protocol):
    """One forward pass over some texts of a batch (``indices`` into the batch's texts)."""

    indices: list[int]


class BatchRunner(Protocol):
    """Splits a batch into forward passes and runs them (both called in worker threads)."""

    def plan(self, texts: list[str]) -> Sequence[Job]:
        """Cut ``texts`` into jobs (forward passes), in the order they should run."""
        ...

    def run(self, job: Job) -> np.ndarray:
        """Run one job; its probabilities, a row per text."""
        ...


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class _Batch:
    """Requests run together; each is answered as soon as the passes holding its texts end."""

    def __init__(self, items: list[_Pending]) -> None:
        self.items = items
        self.texts = [text for item in items for text in item.texts]
        self.owner = [i for i, item in enumerate(items) for _ in item.texts]
        self.offsets = np.cumsum([0] + [len(item.texts) for item in items]).tolist()
        self.left = [len(item.texts) for item in items]
        self.probs: np.ndarray | None = None

    def done(self, job: Job, probs: np.ndarray) -> None:
        if self.probs is None:
            self.probs = np.empty((len(self.texts), probs.shape[1]), dtype=probs.dtype)
        self.probs[job.indices] = probs
        for index in job.indices:
            owner = self.owner[index]
            self.left[owner] -= 1
            future = self.items[owner].future
            if self.left[owner] == 0 and not future.done():  # its caller may have gone
                future.set_result(self.probs[self.offsets[owner] : self.offsets[owner + 1]])

    def fail(self, exc: BaseException, indices: Sequence[int] | None = None) -> None:
        owners = {self.owner[i] for i in indices} if indices is not None else range(len(self.items))
        for owner in owners:
            if not self.items[owner].future.done():
                self.items[owner].future.set_exception(exc)


class DynamicBatcher:
    """Queue requests; run them in batches of up to ``max_batch_size`` texts.

    One collector task takes whatever is queued, and while the batch is not full waits at most
    ``max_batch_wait_s`` for more. The runner splits the batch into forward passes (texts of
    similar length together); ``workers`` passes run at once in worker threads, so the event
    loop keeps serving, and each request is answered when its own texts are done. A request is
    never split across batches. ``max_batch_size=1`` turns batching off. With ``forward``
    (e.g. child processes' `run`), passes are awaited from it instead of run in the threads.
    """

    def __init__(
        self,
        runner: BatchRunner,
        *,
        max_batch_size: int = 32,
        max_batch_wait_s: float = 0.005,
        workers: int = 1,
        observer: BatchObserver | None = None,
        forward: Callable[[Job], Awaitable[np.ndarray]] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_wait_s < 0:
            raise ValueError("max_batch_wait_s must not be negative")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.workers = workers
        self.observer = observer
        self.forward = forward
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._collector: asyncio.Task | None = None
        self._free: asyncio.Semaphore | None = None  # idle worker threads
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fineserve-forward")

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Probabilities [len(texts), C] for ``texts``, once the passes holding them have run."""
        if self._collector is None or self._collector.done():
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(texts, future))
        return await future

    def _start(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._free = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        self._collector = loop.create_task(self._collect_forever(), name="fineserve-batcher")

    async def close(self) -> None:
        """Stop collecting, cancel what is queued, and shut the worker threads down."""
        tasks = [t for t in (self._collector, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free.acquire()  # collect only when a worker can start on it
            held = True
            try:
                batch = _Batch(await self._collect())
                for job in await self._plan(loop, batch):
                    if not held:
                        await self._free.acquire()
                    self._spawn(loop, batch, job)  # the job frees its worker when it ends
                    held = False
            finally:
                if held:
                    self._free.release()

    async def _plan(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> Sequence[Job]:
        started = time.perf_counter()
        try:
            jobs = await loop.run_in_executor(self._executor, self.runner.plan, batch.texts)
        except Exception as exc:  # e.g. the tokenizer failed: the whole batch learns why
            batch.fail(exc)
            return []
        planned = sorted(i for job in jobs for i in job.indices)
        if planned != list(range(len(batch.texts))):  # never leave a caller waiting forever
            batch.fail(RuntimeError(f"the runner planned texts {planned} of {len(batch.texts)}"))
            return []
        if self.observer is not None:
            self.observer(len(batch.texts), [started - item.enqueued for item in batch.items])
        return jobs

    def _spawn(self, loop: asyncio.AbstractEventLoop, batch: _Batch, job: Job) -> None:
        task = loop.create_task(self._run(loop, batch, job))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: _Batch, job: Job) -> None:
        try:
            if self.forward is not None:
                probs = await self.forward(job)
            else:
                probs = await loop.run_in_executor(self._executor, self.runner.run, job)
            batch.done(job, probs)
        except Exception as exc:  # the model failed: the callers of these texts learn why
            batch.fail(exc, job.indices)
        finally:
            self._free.release()

    async def _collect(self) -> list[_Pending]:
        """Take one request (waiting for it), then more until full or the wait runs out.

        The wait counts from when the first request arrived, not from now: under load it has
        already waited for a free worker, so its batch starts at once instead of idling the
        worker for another ``max_batch_wait_s``.
        """
        first = await self._next_live()
        batch = [first]
        size = len(first.texts)
        deadline = first.enqueued + self.max_batch_wait_s
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # noqa: UP041 (py3.10 raises the asyncio one)
                    break
            else:
                item = self._queue.get_nowait()
            if item.future.done():  # cancelled while queued: skip its forward pass
                continue
            if size + len(item.texts) > self.max_batch_size:
                self._carry = item
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _next_live(self) -> _Pending:
        """The carried-over request or the next queued one whose caller is still waiting."""
        while True:
            item = self._carry or await self._queue.get()
            self._carry = None
            if not item.future.done():
                return item
