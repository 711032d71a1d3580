"""Concurrent requests run as one batch: the first waits up to `max_wait_ms` for others, a batch
holds at most `max_batch` samples, and the model runs in a worker thread so the event loop
keeps accepting requests meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# (images, captions) -> (N, C) probabilities
PredictFn = Callable[[Sequence[object], Sequence[str]], np.ndarray]


@dataclass
class BatchStats:
    """Counters for GET /v1/model: how well batching works under the current load."""

    batches: int = 0
    samples: int = 0
    largest: int = 0
    model_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"batches": self.batches, "samples": self.samples, "largest_batch": self.largest,
                "mean_batch": round(self.samples / self.batches, 2) if self.batches else None,
                "model_seconds": round(self.model_seconds, 3)}


class QueueFull(RuntimeError):
    """More samples are waiting than the batcher accepts."""


@dataclass
class _Item:
    image: object
    caption: str
    future: asyncio.Future


@dataclass
class MicroBatcher:
    """Collects (image, caption) samples from concurrent requests into batches for `predict`."""

    predict: PredictFn
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    stats: BatchStats = field(default_factory=BatchStats)
    _queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        """Whether the worker that runs the model is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, images: Sequence[object], captions: Sequence[str]) -> np.ndarray:
        """(N, C) probabilities for these samples, predicted with whatever else is waiting."""
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} samples are waiting")
        loop = asyncio.get_running_loop()
        items = [_Item(img, cap, loop.create_future()) for img, cap in zip(images, captions,
                                                                           strict=True)]
        for item in items:
            self._queue.put_nowait(item)
        return np.stack(await asyncio.gather(*(item.future for item in items)))

    async def _collect(self) -> list[_Item]:
        """The next batch: the first waiting sample and those that arrive within max_wait_ms."""
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_ms / 1000
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._predict(batch)
            except Exception as e:  # the worker must outlive any one batch
                if len(batch) == 1:
                    _fail(batch, e)
                    continue
                for item in batch:  # one bad sample fails only its own request
                    try:
                        await self._predict([item])
                    except Exception as e1:
                        _fail([item], e1)

    async def _predict(self, batch: list[_Item]) -> None:
        t = time.perf_counter()
        probs = await asyncio.get_running_loop().run_in_executor(
            None, self.predict, [b.image for b in batch], [b.caption for b in batch])
        if len(probs) != len(batch):
            raise RuntimeError(f"the model gave {len(probs)} answers for {len(batch)} samples")
        self.stats.batches += 1
        self.stats.samples += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.model_seconds += time.perf_counter() - t
        for b, p in zip(batch, probs, strict=True):
            if not b.future.done():  # a client that went away cancelled its future
                b.future.set_result(p)


def _fail(batch: list[_Item], e: Exception) -> None:
    for b in batch:
        if not b.future.done():
            b.future.set_exception(e)
