"""Continuous batching: several requests decode together, one batched forward per step.

A `Batcher` owns the running sequences of one model. Each `step()` admits waiting requests
(a fresh cache each, or the longest prefix the shared `PromptCache` holds), feeds at most
`prefill_chunk` prompt tokens (of one long prompt, or of several short ones; chunks end at
multiples of `prefill_chunk`, where the prompt cache takes its restore points, and a cancelled
request leaves one where its prefill stopped), then runs one batched one-token step
(`model/batch_decode.py`) for every sequence whose prompt is in, samples each row with that
request's own sampler and processors, and hands each request its `Chunk` through its `sink`. A
new prompt is thus prefilled between the running streams' tokens, a chunk at a time, and a
finished or cancelled sequence leaves the batch (and frees its cache) at the next step, leaving
in the prompt cache the state after its reply (an agent's next turn is this prompt + the reply +
a tool result, so it reads only the new part). Steps
are pipelined: a step's forward is queued before the previous step's tokens are read and handed
out, so the device does not wait on Python; a request's chunk thus comes one step after its
token is computed.

A request's tokens are those it would get alone: its prompt's last token goes through the same
batched step as the others' next tokens, each sequence keeps its own pools, and a seeded request
draws from its own key. Speculative decoding is not used here (its verify step takes several
tokens of one sequence at once). Knows no HTTP; the engine drives `step()` from its thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import mlx.core as mx

from ..model.cache import make_cache
from . import sampling
from .generate import CLEAR_EVERY, Chunk, ChunkMaker, TokenSampler, stop_ids
from .prefill import check_request
from .pacing import paced

log = logging.getLogger("mlx_dsv4.generation.batch")

DONE = object()  # the item a sink receives after a request's last chunk


class Cancelled(Exception):
    """A request left the batch because its caller went away."""


class Request:
    """One generation in the batch: its prompt, options and, once admitted, its decode state."""

    def __init__(self, ids: Sequence[int], sink: Callable[[object], None], *,
                 cancelled: Callable[[], bool] = lambda: False, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, logit_bias: dict[int, float] | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 logprobs: int = 0, logits_processors: Sequence[Callable] = (),
                 progress: Callable[[int, int], None] | None = None, draft: int = 0):
        self.ids, self.sink = list(ids), sink
        self.cancelled = cancelled  # polled at every step
        self.options = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        self.penalties = dict(logit_bias=logit_bias, repetition_penalty=repetition_penalty,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        self.seed, self.stop, self.stop_token_ids = seed, list(stop), list(stop_token_ids)
        self.max_tokens, self.logprobs, self.progress = max_tokens, logprobs, progress
        self.extra_processors = list(logits_processors)
        self.cache = self.sample = self.make = None
        self.trail = None  # the prompt cache's restore points along `cache`
        self.fed = 0  # prompt tokens in the cache
        self.reply: list[int] = []  # the tokens handed out
        self.next: int | mx.array | None = None  # the token the next decode step feeds
        self.pending: tuple[mx.array, mx.array] | None = None  # sampled, not yet handed out
        self.finished = False

    def leave(self, item=DONE):
        """Hand the caller its last item (DONE or an exception) and free the decode state."""
        if not self.finished:
            self.finished = True
            self.cache = self.sample = self.pending = self.trail = None
            self.sink(item)


class Batcher:
    """The running sequences of one model; `add` requests from any thread, `step` on the
    thread that owns MLX. `max_batch` sequences decode together; more wait their turn."""

    def __init__(self, model, tokenizer, *, max_batch: int = 4, max_context: int | None = None,
                 largest_context: int | None = None, kv_bits: int | None = None,
                 prefill_chunk: int = 512, prompt_cache=None, pipeline: bool = True):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.pipeline = pipeline
        self.max_context, self.largest_context = max_context, largest_context
        self.kv_bits, self.prefill_chunk, self.prompt_cache = kv_bits, prefill_chunk, prompt_cache
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self._lock = threading.Lock()
        self._step = None
        self.steps = 0
        self.peak = 0  # the most sequences one step has decoded

    def add(self, request: Request) -> Request:
        with self._lock:
            self.waiting.append(request)
        return request

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def fail(self, error: BaseException):
        """Every request, running or waiting, leaves with `error` (the batch cannot go on)."""
        with self._lock:
            requests, self.waiting = self.active + self.waiting, []
        self.active = []
        for r in requests:
            r.leave(error)

    def step(self):
        """Admit, feed up to `prefill_chunk` prompt tokens, decode one token for every sequence
        whose prompt is in (and hand out the previous step's tokens)."""
        for r in self.active:
            if r.cancelled():
                if r.next is None:  # inside its prefill: a point where it stopped
                    self._keep(r, force=True)
                else:
                    self._keep_reply(r)
                r.leave(Cancelled())
        self.active = [r for r in self.active if not r.finished]
        with self._lock:
            room = self.max_batch - len(self.active)
            admitted, self.waiting = self.waiting[:room], self.waiting[room:]
        for r in admitted:
            self._admit(r)
        self.active += [r for r in admitted if not r.finished]
        budget = self.prefill_chunk
        for r in [r for r in self.active if r.next is None]:
            if budget <= 0:
                break
            budget -= self._prefill(r, budget)
        ready = [r for r in self.active if r.next is not None and not r.finished]
        if ready:
            self.peak = max(self.peak, len(ready))
            self._decode(ready)
        self.active = [r for r in self.active if not r.finished]
        self.steps += 1
        if self.steps % CLEAR_EVERY == 0:
            mx.clear_cache()

    # ----- the steps

    def _admit(self, r: Request):
        """Refuse what cannot run (before any work, as `Session` does); else give it state."""
        if r.cancelled():
            return r.leave(Cancelled())
        try:
            if not r.ids:
                raise ValueError("An empty prompt cannot be continued.")
            check_request(r.ids, r.max_tokens, self.model.args.vocab_size, self.max_context,
                          self.largest_context)
            sampler = sampling.make_sampler(**r.options, seed=r.seed)
            processors = sampling.make_logits_processors(**r.penalties) + r.extra_processors
        except ValueError as e:
            return r.leave(e)
        reused = self._restore(r)
        if r.max_tokens <= 0:
            r.sink(Chunk(finish_reason="length", prompt_tokens=len(r.ids), reused_tokens=reused))
            return r.leave()
        r.sample = TokenSampler(sampler, processors, r.ids)
        eos = stop_ids(self.model, self.tokenizer, r.stop_token_ids)
        r.make = ChunkMaker(self.tokenizer, eos, r.stop, r.stop_token_ids, r.logprobs, r.max_tokens,
                            len(r.ids) - reused, len(r.ids), reused)
        if r.fed == len(r.ids) - 1:
            r.next = r.ids[-1]

    def _restore(self, r: Request) -> int:
        """A fresh cache, holding the prompt cache's longest prefix of the prompt if any."""
        fresh = lambda: make_cache(self.model, max_tokens=self.max_context, kv_bits=self.kv_bits)  # noqa: E731
        found = None if self.prompt_cache is None else self.prompt_cache.lookup_for(r.ids, fresh)
        if found is None:
            r.cache = fresh()
            r.trail = self.prompt_cache.trail() if self.prompt_cache is not None else None
            return 0
        from .prompt_cache import restore

        hit, r.cache = found
        restore(r.cache, hit.state)
        r.fed, r.trail = hit.n, self.prompt_cache.trail(hit.state)
        return hit.n

    def _keep(self, r: Request, force: bool = False):
        """A restore point of `r`'s prompt where its prefill is (if due, or `force`: its end,
        or where a cancelled prefill stopped)."""
        if r.trail is not None and r.cache is not None and r.next is None and r.fed:
            self.prompt_cache.keep(r.trail, r.ids[: r.fed], r.cache, force=force)

    def _keep_reply(self, r: Request):
        """The state after `r`'s reply, as its cache holds it: the prompt and the reply tokens
        fed back so far. Pipelined, that is every token handed out (the one computed past them
        is still unread); unpipelined, all but the last. Only the rows since the prompt's end
        are copied (its earlier points share the rest)."""
        if r.trail is None or r.cache is None or len({c.offset for c in r.cache}) != 1:
            return
        consumed = r.cache[0].offset - len(r.ids)
        if 0 < consumed <= len(r.reply):  # (never a state whose tokens the cache does not hold)
            self.prompt_cache.keep(r.trail, r.ids + r.reply[:consumed], r.cache, force=True)

    def _prefill(self, r: Request, budget: int) -> int:
        """Up to `budget` more tokens of `r`'s prompt (all but its last token, which the decode
        step feeds), to the next multiple of `prefill_chunk` at most; returns how many it fed."""
        start = r.fed
        boundary = (r.fed // self.prefill_chunk + 1) * self.prefill_chunk
        end = min(r.fed + budget, len(r.ids) - 1, boundary)
        try:
            self.model(mx.array(r.ids[r.fed : end])[None], r.cache, last_only=True)
            with paced(self.model.args, end - start, end):
                mx.eval([c.state for c in r.cache])
            r.fed = end
            self._keep(r, force=end == len(r.ids) - 1)
            if r.progress:  # as `Session` counts: the tokens this request reads, no reused prefix
                reused = r.make.reused_tokens
                r.progress(end - reused, len(r.ids) - reused)
        except Cancelled as e:
            self._keep(r, force=True)
            r.leave(e)
            return end - start
        except Exception as e:  # this request's failure, not the batch's
            log.exception("prefill failed")
            r.leave(e)
            return end - start
        if end == len(r.ids) - 1:
            r.next = r.ids[-1]
        return end - start

    def _decode(self, ready: list[Request]):
        """One token for each of `ready`; with `pipeline`, the previous step's tokens are read
        and handed out while this step computes (as `generate_step` does for one request)."""
        if self._step is None:
            self._step = self.model.batch_step()
        try:
            # A sampled token is fed still unread; a prompt's last token is a number.
            ids = mx.concatenate([r.next.astype(mx.int32) if isinstance(r.next, mx.array)
                                  else mx.array([r.next], mx.int32) for r in ready])[:, None]
            if len(ready) == 1:  # alone: the model's own whole-trunk compiled step is faster
                logits = self.model(ids, ready[0].cache, last_only=True)
            else:
                logits = self._step(ids, [r.cache for r in ready])
            picks = [r.sample(logits[b : b + 1, -1, :]) for b, r in enumerate(ready)]
            mx.async_eval([y for y, _ in picks])
        except Exception as e:  # a failed forward leaves every sequence in it unusable
            log.exception("batched decode failed")
            for r in ready:
                r.leave(e)
            return
        for r, pick in zip(ready, picks):
            if self.pipeline:
                pick, r.pending = r.pending, pick
            r.next = r.pending[0] if self.pipeline else pick[0]
            if pick is not None:
                self._hand_out(r, *pick)

    def _hand_out(self, r: Request, y: mx.array, lp: mx.array):
        try:
            chunk = r.make(y.item(), lp)
        except Exception as e:
            log.exception("decode failed")
            return r.leave(e)
        r.reply.append(chunk.token)
        r.sink(chunk)
        if chunk.finish_reason:
            self._keep_reply(r)
            r.leave()  # a token computed past the end, if any, goes with the state
