"""Generation: `generate_step` (token ids in, ids out), `stream_generate` (`Chunk`s with text,
finish reason and stats) and `generate` (the fold of the stream).

Every consumer — tests, `dsv4 chat`, the HTTP server — reads the same `stream_generate` stream;
stopping (EOS, stop ids, stop strings, max tokens) and streaming detokenization happen here and
nowhere else. The generator knows no chat format and no HTTP. Decode is pipelined: step n+1 is
queued with `mx.async_eval` before token n is handed out, so after the consumer has seen a token
the cache has consumed it (`cache[0].offset` counts prompt + handed-out tokens).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from ..model.cache import LayerCache, make_cache
from . import speculative
from .prefill import check_request, prefill
from .sampling import PROCESSOR_CONTEXT, make_distribution, make_logits_processors, make_sampler

CLEAR_EVERY = 256  # decode steps between MLX buffer-cache clears


@dataclass
class Chunk:
    """One step of the stream: a text delta (possibly empty) and the token that produced it."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    stop: str | None = None  # the stop string or token that ended generation, if any
    acceptance: float | None = None  # share of drafted tokens kept so far (speculation only)
    tokens_per_forward: float | None = None  # tokens committed per trunk forward (likewise)


class TokenSampler:
    """One request's sampling: its logits processors, then its sampler; `logits [1, V]` ->
    `(token [1], logprobs [V])`. Processors see only the recent tokens (mlx-lm's penalties read
    the last 20): a bounded tail avoids copying the whole, growing history on every step."""

    def __init__(self, sampler: Callable[[mx.array], mx.array] | None,
                 processors: Sequence[Callable] | None, context: Sequence[int]):
        self.sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
        self.processors = list(processors or [])
        self.tokens = mx.array(list(context)[-PROCESSOR_CONTEXT:]) if self.processors else None

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        for proc in self.processors:
            logits = proc(self.tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = self.sampler(logprobs)
        if self.processors:
            self.tokens = mx.concatenate([self.tokens[-(PROCESSOR_CONTEXT - 1):], y])
        return y, logprobs[0]


def generate_step(model, prompt_ids: Sequence[int], cache: list[LayerCache], *,
                  sampler: Callable[[mx.array], mx.array] | None = None,
                  logits_processors: list | None = None, max_tokens: int = 256,
                  prefill_chunk: int = 512, history: Sequence[int] = (),
                  progress: Callable[[int, int], None] | None = None,
                  on_prefilled: Callable[[], None] | None = None,
                  on_chunk: Callable[[], None] | None = None) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs [V])` for up to `max_tokens` tokens after `prompt_ids`.

    `cache` may already hold a prefix (`history`, used by logits processors); `prompt_ids` are
    the new tokens, at least one. `on_chunk` and `on_prefilled` run as in `prefill`.
    """
    if not prompt_ids:
        raise ValueError("generate_step needs at least one new prompt token.")
    sample = TokenSampler(sampler, logits_processors, list(history) + list(prompt_ids))
    y, logprobs = sample(prefill(model, prompt_ids, cache, prefill_chunk, progress, on_prefilled,
                                 on_chunk=on_chunk))
    mx.async_eval(y, logprobs)
    n = 0
    while n < max_tokens:
        if n == 0:
            mx.eval(y)
            if progress:
                progress(len(prompt_ids), len(prompt_ids))
        # Queue step n+1 before handing out token n: the device never waits on Python.
        next_y, next_lp = sample(model(y[None], cache, last_only=True)[:, -1, :])
        mx.async_eval(next_y, next_lp)
        yield y.item(), logprobs
        n += 1
        if n % CLEAR_EVERY == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_lp


class StopMatcher:
    """Holds back text while it could still become a stop string; never emits a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string hit or None)."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            i, stop = min(hits)
            out, self.pending = self.pending[:i], ""
            return out, stop
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(model, tokenizer, prompt: str | Sequence[int], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: float | None = None,
                    presence_penalty: float | None = None, frequency_penalty: float | None = None,
                    logit_bias: dict[int, float] | None = None, seed: int | None = None, stop: Sequence[str] = (),
                    stop_token_ids: Sequence[int] = (), logprobs: int = 0,
                    logits_processors: Sequence[Callable] = (),
                    cache: list[LayerCache] | None = None, history: Sequence[int] = (),
                    reused_tokens: int = 0, prefill_chunk: int = 512,
                    max_context: int | None = None, largest_context: int | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    on_prefilled: Callable[[], None] | None = None,
                    on_chunk: Callable[[], None] | None = None, draft: int = 0,
                    drafter=None, spec_stats=None) -> Iterator[Chunk]:
    """Text chunks for `prompt` (a string or token ids), ending with a chunk that has a
    `finish_reason`. `cache` may already hold `history` (prefix reuse); `max_context` refuses,
    before any work, a prompt plus `max_tokens` that does not fit. `draft > 0` decodes
    speculatively (speculative.py) with `drafter`, by default the model's MTP block; the output
    distribution is unchanged, `spec_stats` (a `SpecStats`) counts forwards and acceptance.
    `logits_processors` run after the built-in ones (a grammar constraint goes last, so nothing
    re-allows what it masks)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_request(ids, max_tokens, model.args.vocab_size, max_context, largest_context, len(history))
    total_prompt = len(history) + len(ids)
    if max_tokens <= 0:
        yield Chunk(finish_reason="length", prompt_tokens=total_prompt, reused_tokens=reused_tokens)
        return
    if cache is None:
        cache = make_cache(model, max_tokens=max_context)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(
        logit_bias=logit_bias, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty) + list(logits_processors)
    mx.reset_peak_memory()
    # A processor that follows the reply token by token (a grammar) cannot be shown drafts.
    sequential = any(getattr(p, "sequential", False) for p in logits_processors)
    speculating = draft > 0 and not sequential and (
        drafter is not None or bool(getattr(model, "mtp", None)))
    if speculating:
        spec_stats = spec_stats if spec_stats is not None else speculative.SpecStats()
        steps = speculative.speculative_step(
            model, ids, cache, drafter or speculative.MTPDrafter(model, position=len(history)),
            distribution=make_distribution(temperature, top_p=top_p, min_p=min_p, top_k=top_k),
            draft=draft, logits_processors=processors, max_tokens=max_tokens,
            prefill_chunk=prefill_chunk, history=history, progress=progress,
            on_prefilled=on_prefilled, on_chunk=on_chunk, stats=spec_stats)
    else:
        steps = generate_step(model, ids, cache, sampler=sampler, logits_processors=processors,
                              max_tokens=max_tokens, prefill_chunk=prefill_chunk, history=history,
                              progress=progress, on_prefilled=on_prefilled, on_chunk=on_chunk)
    make = ChunkMaker(tokenizer, stop_ids(model, tokenizer, stop_token_ids), stop, stop_token_ids,
                      logprobs, max_tokens, len(ids), total_prompt, reused_tokens,
                      spec_stats if speculating else None)
    with contextlib.closing(steps):  # closed on any exit, so a speculative round rolls back
        for token, lp in steps:
            chunk = make(token, lp)
            yield chunk
            if chunk.finish_reason:
                return


def stop_ids(model, tokenizer, stop_token_ids: Sequence[int]) -> set[int]:
    """The ids that end a reply: the tokenizer's and the model's EOS, and the request's own."""
    return set(tokenizer.eos_token_ids) | set(getattr(model.args, "eos_token_ids", [])) | set(stop_token_ids)


class ChunkMaker:
    """Turns one request's tokens into `Chunk`s: streaming detokenization, stop ids and strings,
    the length limit, logprobs and rates. The chunk that ends the reply has a `finish_reason`."""

    def __init__(self, tokenizer, eos: set[int], stop: Sequence[str], stop_token_ids: Sequence[int],
                 logprobs: int, max_tokens: int, new_tokens: int, total_prompt: int,
                 reused_tokens: int, spec_stats=None):
        self.tokenizer, self.eos, self.stop_token_ids = tokenizer, eos, stop_token_ids
        self.detok, self.matcher = tokenizer.detokenizer(), StopMatcher(stop)
        self.logprobs, self.max_tokens, self.spec_stats = logprobs, max_tokens, spec_stats
        self.new_tokens, self.total_prompt, self.reused_tokens = new_tokens, total_prompt, reused_tokens
        self.start, self.prompt_time, self.n = time.perf_counter(), None, 0

    def __call__(self, token: int, lp: mx.array) -> Chunk:
        self.n += 1
        n = self.n
        if self.prompt_time is None:
            self.prompt_time = time.perf_counter() - self.start
            self.start = time.perf_counter()
        chunk = Chunk(token=token, prompt_tokens=self.total_prompt, reused_tokens=self.reused_tokens,
                      generation_tokens=n, prompt_tps=self.new_tokens / max(self.prompt_time, 1e-9),
                      generation_tps=n / max(time.perf_counter() - self.start, 1e-9),
                      peak_memory=mx.get_peak_memory() / 1e9)
        if self.spec_stats is not None:
            chunk.acceptance, chunk.tokens_per_forward = (self.spec_stats.acceptance,
                                                          self.spec_stats.tokens_per_forward)
        if self.logprobs:
            chunk.logprob, chunk.top_logprobs = _top(lp, token, self.logprobs)
        detok, matcher = self.detok, self.matcher
        if token in self.eos:
            chunk.text, chunk.finish_reason = matcher.flush() + detok.finalize(), "stop"
            chunk.stop = self.tokenizer.decode([token]) if token in self.stop_token_ids else None
            return chunk
        chunk.text, hit = matcher.feed(detok.add(token))
        if hit is not None:
            chunk.finish_reason, chunk.stop = "stop", hit
            return chunk
        if n == self.max_tokens:
            chunk.text += matcher.feed(detok.finalize())[0] + matcher.flush()
            chunk.finish_reason = "length"
        return chunk


def _top(logprobs: mx.array, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    n = min(n, logprobs.shape[-1])
    idx = mx.argpartition(-logprobs, n - 1)[:n]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    top = [(int(i), float(v)) for i, v in zip(idx[order].tolist(), vals[order].tolist())]
    return float(logprobs[token].item()), top


def generate(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole reply as one string: the fold of `stream_generate`."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))
