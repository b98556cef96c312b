"""The engine: one thread that owns the model, the session and all MLX work.

MLX streams are thread-local, so the generator never runs on the event loop or in a threadpool.
Requests (`Job`s) are queued when submitted (at most `max_queue` waiting) and served in order;
each carries the event loop and an `asyncio.Queue` that the thread fills with
`loop.call_soon_threadsafe`: the job's `Chunk`s, and before them, when the job asks, a `Progress`
after each prefill chunk (so a stream can show activity while a long prompt is read). Cancellation is a per-job `threading.Event` (set when the consumer
goes away, or is dropped unread), checked between tokens and between prefill chunks. The engine
knows token ids and `Chunk`s, not HTTP or the chat format.

With a backend that batches (`generation.batch.Batcher`) and `max_batch > 1`, up to `max_batch`
jobs run at once: each job's own code (`Job.run`, which may chain generations) runs on a small
thread of its own that does no MLX work, and its `generate` calls become requests in the batch,
whose chunks the engine thread, stepping the batch, hands back through a queue. Other MLX work a
job needs (scoring a prompt) is handed to the engine thread too, and done between batch steps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence

from ..generation.batch import DONE, Cancelled, Request
from ..generation.generate import Chunk
from ..generation.score import Scored, prompt_logprobs
from ..threads import start_thread

log = logging.getLogger("mlx_dsv4.serve")


class Backend(Protocol):
    """What the engine drives: the real one is `session.Session`; tests use a scripted one."""

    max_context: int | None

    def generate(self, ids: Sequence[int], **sampling) -> Iterator[Chunk]:
        """Chunks for the full prompt `ids` (`max_tokens`, `temperature`, `stop`, `stop_token_ids`,
        `logit_bias`, `logprobs`, `seed`, `progress`, ... as in `stream_generate`)."""

    # Optional: `score(ids, top) -> Iterator[list[Scored]]`, the prompt's own logprobs chunk by
    # chunk (`score.prompt_logprobs`); a backend without it cannot report them.


class Busy(Exception):
    pass


class Refused(Exception):
    """The backend refused a job before generating anything: it raised `ValueError` (a token id
    outside the vocabulary, a context that does not fit), so the request, not the server, is at fault."""

    def __init__(self, error: ValueError):
        super().__init__(str(error))
        self.error = error


class Stopped(Exception):
    pass


@dataclass
class Job:
    """A prompt and its sampling parameters; subclasses may run several generations."""

    ids: list[int]
    sampling: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[object], None] = lambda item: None
    report_progress: bool = False  # also hand the reader a `Progress` after each prefill chunk

    def run(self, backend: Backend, **extra) -> Iterator[Chunk]:
        return backend.generate(self.ids, **self.sampling, **extra)


_END = object()


@dataclass(frozen=True)
class Progress:
    """Prefill progress of a job: `done` of the `total` prompt tokens its backend reads itself
    (a prefix reused from a cache is in neither), as the backend's `progress` callback says."""

    done: int
    total: int


class PrefillLog:
    """Logs a long prefill's progress at INFO, at most every `every` seconds, from the first
    `every` seconds on: "prefill 4096/20000 tokens, 210 tok/s, ~66 s left"."""

    def __init__(self, every: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.start = self.last = clock()

    def __call__(self, done: int, total: int):
        now = self.clock()
        if 0 < done < total and now - self.last >= self.every:
            self.last = now
            rate = done / (now - self.start)
            log.info("prefill %d/%d tokens, %.0f tok/s, ~%.0f s left", done, total, rate,
                     (total - done) / rate)


class _BatchedBackend:
    """What a job's `run` sees in batched mode: `generate` hands the request to the batch and
    yields its chunks as the engine thread produces them; leaving early cancels the request."""

    def __init__(self, engine: "Engine", job: Job):
        self.engine, self.job = engine, job
        self.max_context = engine.backend.max_context

    def generate(self, ids: Sequence[int], **sampling) -> Iterator[Chunk]:
        inbox: queue.Queue = queue.Queue()
        left = threading.Event()
        request = Request(ids, inbox.put, cancelled=lambda: left.is_set() or self.job.cancel.is_set(),
                          **sampling)
        self.engine._add(request)
        try:
            while (item := inbox.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            left.set()

    def score(self, ids: Sequence[int], top: int = 0) -> Iterator[list[Scored]]:
        """`score.prompt_logprobs` with the batch's model, each chunk computed on the engine thread
        between two batch steps: the running streams go on while a prompt is scored."""
        b = self.engine.backend
        chunks = prompt_logprobs(b.model, ids, top, chunk=b.prefill_chunk, kv_bits=b.kv_bits)
        try:  # (a generator runs nothing until its first `next`: all its MLX work is on the engine thread)
            while (part := self.engine._call(lambda: next(chunks, None))) is not None:
                yield part
        finally:
            self.engine._call(chunks.close)  # its arrays are freed where they were made


class Engine:
    def __init__(self, load: Callable[[], Backend], max_queue: int = 64, max_batch: int = 1):
        self._load, self.max_queue, self.max_batch = load, max_queue, max_batch
        self._running = 0  # jobs on their own threads (batched mode)
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()  # batched mode
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.backend: Backend | None = None
        self.error: BaseException | None = None
        self.loaded = threading.Event()

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = start_thread(self._run, name="dsv4-engine")
        return self

    def stop(self, timeout: float = 10.0):
        """Finish the job being served; jobs still waiting get an error."""
        if self._thread is not None:
            with self._changed:
                self._stopping = True
                self._changed.notify()
            self._thread.join(timeout)
            self._thread = None

    def _next(self) -> Job | None:
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                for job in self._waiting:
                    job.emit(Stopped("The server is shutting down."))
                    job.emit(_END)
                self._waiting.clear()
                return None
            return self._waiting.popleft()

    def _run(self):
        try:
            self.backend = self._load()
        except BaseException as e:  # reported by /health, to every request, and by `serve`
            log.debug("loading the model failed", exc_info=e)
            self.error = e
        self.loaded.set()
        if self.error is None and self.max_batch > 1 and hasattr(self.backend, "step"):
            return self._run_batched()
        while (job := self._next()) is not None:
            if self.error is not None:
                job.emit(self.error)
            elif not job.cancel.is_set():
                self._serve(job, self.backend)
            job.emit(_END)

    def _serve(self, job: Job, backend: Backend):
        report = PrefillLog()

        def progress(done: int, total: int):
            if job.cancel.is_set():
                raise Cancelled
            report(done, total)
            if job.report_progress:
                job.emit(Progress(done, total))

        generated, last = False, None
        try:
            with contextlib.closing(iter(job.run(backend, progress=progress))) as chunks:
                for chunk in chunks:
                    generated, last = generated or chunk.token is not None, chunk
                    job.emit(chunk)
                    if job.cancel.is_set():
                        break
            if last is not None and last.acceptance is not None:
                log.info("%d tokens, MTP drafts %.0f%% kept, %.2f tokens per forward",
                         last.generation_tokens, 100 * last.acceptance, last.tokens_per_forward)
        except Cancelled:
            pass
        except ValueError as e:
            if generated:
                log.exception("generation failed")
            else:
                log.info("refused: %s", e)
            job.emit(e if generated else Refused(e))
        except Exception as e:
            log.exception("generation failed")
            job.emit(e)

    # ----- batched mode

    def _add(self, request: Request):
        with self._changed:
            self.backend.add(request)
            self._changed.notify()

    def _call(self, fn: Callable[[], object]) -> object:
        """`fn()` run on the engine thread between batch steps, for a job's thread (which does no
        MLX work itself): its result, or the exception it raised, raised here."""
        done, box = threading.Event(), []

        def call():
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the job, as the batch hands a failed request its error
                box.append((False, e))
            done.set()

        with self._changed:
            self._calls.append(call)
            self._changed.notify()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _job_thread(self, job: Job):
        try:
            self._serve(job, _BatchedBackend(self, job))
        finally:
            job.emit(_END)
            with self._changed:
                self._running -= 1
                self._changed.notify()

    def _run_batched(self):
        """Start jobs while fewer than `max_batch` run; step the batch while it has work."""
        while self._wait_for_work():
            with self._changed:
                call = self._calls.popleft() if self._calls else None
            if call is not None:  # one per turn (a chunk of prompt scoring), between batch steps
                call()
            if not self.backend.busy:
                continue
            try:
                self.backend.step()
            except Exception as e:  # a broken step must not leave jobs waiting on it forever
                log.exception("batched step failed")
                self.backend.fail(e)

    def _wait_for_work(self) -> bool:
        """Start what may start and wait until the batch has work: True, or False once stopping
        with nothing left running."""
        with self._changed:
            while True:
                self._start_waiting()
                if self._stopping:
                    for job in self._waiting:
                        job.emit(Stopped("The server is shutting down."))
                        job.emit(_END)
                    self._waiting.clear()
                    if not self._running and not self.backend.busy:
                        return False
                if self.backend.busy or self._calls:
                    return True
                self._changed.wait()

    def _start_waiting(self):
        """Each waiting job, while fewer than `max_batch` run, on a thread of its own (lock held)."""
        while self._waiting and self._running < self.max_batch and not self._stopping:
            job = self._waiting.popleft()
            if job.cancel.is_set():
                job.emit(_END)
                continue
            self._running += 1
            threading.Thread(target=self._job_thread, args=(job,), daemon=True,
                             name="dsv4-job").start()

    def submit(self, job: Job) -> AsyncIterator[Chunk | Progress]:
        """Queue `job` and return its chunks (and `Progress` items); leaving the iterator early, or dropping it unread,
        cancels the job. Raises `Busy` when `max_queue` jobs are already waiting. Call it on the
        event loop that will read the chunks."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        job.emit = emit
        with self._changed:
            live = [j for j in self._waiting if not j.cancel.is_set()]
            self._waiting = collections.deque(live)  # abandoned jobs do not count
            if len(live) >= self.max_queue:
                raise Busy(f"{len(live)} requests are already waiting, as many as this server "
                           "queues; try again shortly.")
            self._waiting.append(job)
            self._changed.notify()
        chunks = self._drain(job, inbox)
        weakref.finalize(chunks, job.cancel.set)
        return chunks

    async def _drain(self, job: Job, inbox: asyncio.Queue) -> AsyncIterator[Chunk | Progress]:
        try:
            while (item := await inbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel.set()
