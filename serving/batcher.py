"""Dynamic batching: coalesce concurrent requests into one forward pass run off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

#: Runs one batch: texts in, float32 probabilities [len(texts), C] out (called in a worker thread).
BatchFn = Callable[[list[str]], np.ndarray]
#: Told about every batch run: (number of texts, seconds each request waited in the queue).
BatchObserver = Callable[[int, list[float]], None]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Queue requests and run them in batches of up to ``max_batch_size`` texts.

    One collector task takes whatever is queued; while the batch is not full it waits at most
    ``max_batch_wait_s`` for more. Up to ``max_concurrent_batches`` forward passes run at once,
    each in its own worker thread, so the event loop keeps serving meanwhile. A request is never
    split: one with more texts than ``max_batch_size`` runs as a batch of its own.
    ``max_batch_size=1`` turns batching off (one request per forward pass).
    """

    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int = 16,
        max_batch_wait_s: float = 0.005,
        max_concurrent_batches: int = 1,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_wait_s < 0:
            raise ValueError("max_batch_wait_s must not be negative")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_concurrent_batches = max_concurrent_batches
        self.observer = observer
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._collector: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent_batches, thread_name_prefix="fineserve-forward"
        )

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Probabilities for ``texts`` once the batch holding them has run."""
        if self._collector is None or self._collector.done():
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(texts, future))
        return await future

    def _start(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self.max_concurrent_batches)
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
            await self._slots.acquire()  # a worker thread is free
            try:
                batch = await self._collect(loop)
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._run(loop, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        try:
            texts = [text for item in batch for text in item.texts]
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._executor, self.run_batch, texts)
            except Exception as exc:  # the model failed: every caller in the batch learns why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            if self.observer is not None:
                self.observer(len(texts), [started - item.enqueued for item in batch])
            offset = 0
            for item in batch:
                if not item.future.done():  # the caller may have gone away meanwhile
                    item.future.set_result(probs[offset : offset + len(item.texts)])
                offset += len(item.texts)
        finally:
            self._slots.release()

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """Take one request (waiting for it), then more until full or the wait runs out."""
        first = await self._next_live()
        batch = [first]
        size = len(first.texts)
        deadline = loop.time() + self.max_batch_wait_s
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
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
