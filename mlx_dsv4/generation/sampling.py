"""Sampling: turn a step's log-probabilities into a token, and the logits processors before it.

`make_sampler(temperature, top_p, min_p, top_k)` returns `fn(logprobs [B, V]) -> ids [B]`;
`make_logits_processors(...)` returns `fn(recent_tokens, logits) -> logits` callables (bias,
repetition, presence and frequency penalties over the last `context` tokens). The semantics are
mlx-lm's (tests compare against it); they live here so that starting a chat or server does not
import mlx-lm, whose package import pulls in transformers (and torch) for ~1.5-4 s.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

PENALTY_CONTEXT = 20  # tokens the penalties look back over
PROCESSOR_CONTEXT = 64  # recent tokens handed to logits processors (more than their windows)
# Below this a temperature samples greedily, as 0 does: dividing by it would overflow the logits
# (1e-300 made them infinite); from it up they stay below ~1e10, far from float32's 3e38.
MIN_TEMPERATURE = 1e-6


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the most likely tokens whose mass reaches `p` (always at least the best one)."""
    ordered = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ordered.astype(mx.float32))
    above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    total = above[..., :1] + probs[..., :1]
    dropped = (above >= p * total).sum(axis=-1, keepdims=True)
    cutoff = mx.take_along_axis(ordered, dropped, axis=-1)
    return mx.where(logprobs < cutoff, -mx.inf, logprobs)


def _min_p(logprobs: mx.array, p: float) -> mx.array:
    """Drop tokens less likely than `p` times the most likely one."""
    floor = logprobs.max(axis=-1, keepdims=True) + math.log(p)
    return mx.where(logprobs < floor, -mx.inf, logprobs)


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def _filters(temperature: float, top_p: float, min_p: float, top_k: int):
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}.")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}.")
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1:
        filters.append(lambda lp: _top_p(lp, top_p))
    if min_p > 0:
        filters.append(lambda lp: _min_p(lp, min_p))
    if top_k > 0:
        filters.append(lambda lp: _top_k(lp, top_k) if top_k < lp.shape[-1] else lp)

    def tempered(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return logprobs * (1.0 / temperature)

    return tempered


def make_sampler(temperature: float = 0.0, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0, seed: int | None = None) -> Sampler:
    """Greedy at temperature 0 (or below `MIN_TEMPERATURE`); otherwise categorical over the
    filtered, tempered distribution.

    `top_p` outside (0, 1), `min_p` 0 and `top_k` 0 (or not below the vocabulary) filter nothing.
    With `seed`, draws come from a key of the sampler's own: those of `mx.random.seed(seed)`
    followed by this sampler alone, whatever else draws in between (a batch of requests).
    """
    tempered = _filters(temperature, top_p, min_p, top_k)
    if temperature < MIN_TEMPERATURE:
        return greedy
    if seed is None:
        return lambda logprobs: mx.random.categorical(tempered(logprobs))
    key = mx.random.key(seed)

    def sample(logprobs):
        nonlocal key
        key, sub = mx.random.split(key)  # what the global key does on each draw
        return mx.random.categorical(tempered(logprobs), key=sub)

    return sample


def make_distribution(temperature: float = 0.0, top_p: float = 0.0, min_p: float = 0.0,
                      top_k: int = 0) -> Callable[[mx.array], mx.array]:
    """The distribution `make_sampler` draws from, as probabilities `[..., V]` (fp32): one-hot
    at the argmax for temperature 0. Speculative decoding compares draft and target with it."""
    tempered = _filters(temperature, top_p, min_p, top_k)
    if temperature < MIN_TEMPERATURE:
        def one_hot(logprobs: mx.array) -> mx.array:
            return (mx.arange(logprobs.shape[-1]) == greedy(logprobs)[..., None]).astype(mx.float32)

        return one_hot
    return lambda logprobs: mx.softmax(tempered(logprobs).astype(mx.float32), axis=-1)


def make_logits_processors(logit_bias: dict[int, float] | None = None,
                           repetition_penalty: float | None = None,
                           presence_penalty: float | None = None,
                           frequency_penalty: float | None = None,
                           context: int = PENALTY_CONTEXT) -> list[LogitsProcessor]:
    """Processors for the given options, in that order; `None` or 0 leaves an option out."""
    out: list[LogitsProcessor] = []

    def recent(apply):
        # Each penalty reads only the last `context` tokens, and none before any exist.
        return lambda tokens, logits: apply(tokens[-context:], logits) if len(tokens) else logits

    if logit_bias:
        ids, values = mx.array(list(logit_bias)), mx.array(list(logit_bias.values()))
        out.append(lambda _, logits: logits.at[:, ids].add(values))
    if repetition_penalty:
        if repetition_penalty < 0:
            raise ValueError(f"repetition_penalty must be >= 0, got {repetition_penalty}.")

        def repetition(tokens, logits):
            seen = logits[:, tokens]
            logits[:, tokens] = mx.where(seen < 0, seen * repetition_penalty,
                                         seen / repetition_penalty)
            return logits

        out.append(recent(repetition))
    if presence_penalty:
        def presence(tokens, logits):
            logits[:, tokens] -= presence_penalty  # once per token, however often it appears
            return logits

        out.append(recent(presence))
    if frequency_penalty:
        # Repeated ids accumulate: each occurrence subtracts once more.
        out.append(recent(lambda tokens, logits: logits.at[:, tokens].subtract(frequency_penalty)))
    return out
