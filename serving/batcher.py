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
    """Queue requests; one worker task runs them in batches of up to ``max_batch_size`` texts.

    The worker takes whatever is queued; while the batch is not full it waits at most
    ``max_batch_wait_s`` for more. A request is never split: one with more texts than
    ``max_batch_size`` runs as a batch of its own. ``max_batch_size=1`` turns batching off
    (each request runs alone, still off the event loop).
    """

    def __init__(
        self,
        run_batch: BatchFn,
        *,
        max_batch_size: int = 32,
        max_batch_wait_s: float = 0.005,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_wait_s < 0:
            raise ValueError("max_batch_wait_s must not be negative")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.observer = observer
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._worker: asyncio.Task | None = None
        # one thread: forward passes run one after another, each using torch's intra-op threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fineserve-forward")

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Probabilities for ``texts`` once the batch holding them has run."""
        if self._worker is None or self._worker.done():
            self._start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(texts, future))
        return await future

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        self._carry = None
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._work(), name="fineserve-batcher")

    async def close(self) -> None:
        """Stop the worker (queued requests are cancelled) and the forward thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            texts = [text for item in batch for text in item.texts]
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._executor, self.run_batch, texts)
            except Exception as exc:  # the model failed: every caller in the batch learns why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            if self.observer is not None:
                self.observer(len(texts), [started - item.enqueued for item in batch])
            offset = 0
            for item in batch:
                if not item.future.done():  # the caller may have gone away meanwhile
                    item.future.set_result(probs[offset : offset + len(item.texts)])
                offset += len(item.texts)

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
