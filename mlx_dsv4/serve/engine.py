"""The engine: one thread that owns the model, the session and all MLX work.

MLX streams are thread-local, so the generator never runs on the event loop or in a threadpool.
Requests (`Job`s) are queued and served one at a time, in order; each carries the event loop and
an `asyncio.Queue` that the thread fills with `loop.call_soon_threadsafe`. Cancellation is a
per-job `threading.Event` (set when the consumer goes away), checked between tokens and between
prefill chunks. The engine knows token ids and `Chunk`s, not HTTP or the chat format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence

from ..generate import Chunk

log = logging.getLogger("mlx_dsv4.serve")


class Backend(Protocol):
    """What the engine drives: the real one is `session.Session`; tests use a scripted one."""

    max_context: int | None

    def generate(self, ids: Sequence[int], **sampling) -> Iterator[Chunk]:
        """Chunks for the full prompt `ids` (`max_tokens`, `temperature`, `stop`, `stop_token_ids`,
        `logit_bias`, `logprobs`, `seed`, `progress`, ... as in `stream_generate`)."""


class Cancelled(Exception):
    pass


class Busy(Exception):
    pass


@dataclass
class Job:
    """A prompt and its sampling parameters; subclasses may run several generations."""

    ids: list[int]
    sampling: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[object], None] = lambda item: None

    def run(self, backend: Backend, **extra) -> Iterator[Chunk]:
        return backend.generate(self.ids, **self.sampling, **extra)


_END = object()


class Engine:
    def __init__(self, load: Callable[[], Backend], max_queue: int = 64):
        self._load, self.max_queue = load, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.backend: Backend | None = None
        self.error: BaseException | None = None
        self.loaded = threading.Event()

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self):
        try:
            self.backend = self._load()
        except BaseException as e:  # reported by /health and to every request
            log.exception("loading the model failed")
            self.error = e
        self.loaded.set()
        while (job := self._jobs.get()) is not None:
            if self.error is not None:
                job.emit(self.error)
            elif not job.cancel.is_set():
                self._serve(job)
            job.emit(_END)

    def _serve(self, job: Job):
        def progress(done: int, total: int):
            if job.cancel.is_set():
                raise Cancelled

        try:
            with contextlib.closing(iter(job.run(self.backend, progress=progress))) as chunks:
                for chunk in chunks:
                    job.emit(chunk)
                    if job.cancel.is_set():
                        break
        except Cancelled:
            pass
        except Exception as e:
            log.exception("generation failed")
            job.emit(e)

    def submit(self, job: Job) -> AsyncIterator[Chunk]:
        """Chunks of `job`, queued on first iteration; leaving the iterator early cancels it.
        Raises `Busy` at once when the queue is full."""
        if self._jobs.qsize() >= self.max_queue:
            raise Busy(f"{self._jobs.qsize()} requests are waiting; try again shortly.")
        return self._drain(job)

    async def _drain(self, job: Job) -> AsyncIterator[Chunk]:
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        job.emit = emit
        self._jobs.put(job)
        try:
            while (item := await inbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()
