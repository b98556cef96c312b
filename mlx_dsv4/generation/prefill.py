"""A prompt into the cache: ids checked against the vocabulary and the planned context before any
work, then fed in chunks (`prefill`), each evaluated paced to the planned working set.

Below `generate` and `speculative`, which both start a reply with it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx

from ..model.cache import LayerCache
from .pacing import paced


class ContextError(ValueError):
    """A request that cannot fit the planned context; raised before anything is computed."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int, largest: int | None = None):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        fits = f"; the largest context that fits this machine is {largest:,} tokens" if largest else ""
        super().__init__(
            f"The prompt ({prompt_tokens:,} tokens) plus max_tokens ({max_tokens:,}) needs "
            f"{prompt_tokens + max_tokens:,} tokens, more than the planned context of {limit:,}{fits}.")


def check_token_ids(ids: Sequence[int], vocab_size: int):
    """Refuse ids the embedding cannot look up: an out-of-range gather reads past the table
    (garbage, or a crash on some backends), so no id reaches the model unchecked."""
    if ids and 0 <= min(ids) and max(ids) < vocab_size:
        return
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"Token id {t} at position {i} is outside the vocabulary "
                             f"[0, {vocab_size}).")


def check_request(ids: Sequence[int], max_tokens: int, vocab_size: int, max_context: int | None = None,
                  largest_context: int | None = None, history: int = 0):
    """Refuse, before any work, ids outside the vocabulary and a prompt (after `history` tokens
    the cache already holds) plus `max_tokens` that does not fit `max_context`."""
    check_token_ids(ids, vocab_size)
    total = history + len(ids)
    if max_context is not None and total + max_tokens > max_context:
        raise ContextError(total, max_tokens, max_context, largest_context)


def prefill(model, ids: Sequence[int], cache: list[LayerCache], chunk: int = 512,
            progress: Callable[[int, int], None] | None = None,
            on_prefilled: Callable[[], None] | None = None,
            observe: Callable[[mx.array, int], None] | None = None,
            on_chunk: Callable[[], None] | None = None):
    """Feed `ids` into the cache in chunks; return the last position's logits `[1, V]`.

    Chunks end at multiples of `chunk` counted from the sequence's start (the first may be
    shorter), so a prefill resumed from a restore point at such a multiple runs the same chunks
    as one from the start. `on_chunk` runs after each chunk, once the cache holds it (restore
    points are taken there); `on_prefilled` when the cache holds all but the last token: a
    snapshot taken there lets the same prompt be continued again by feeding just that token.
    With `observe`, each chunk's final residual streams `[1, S, N, D]` go to
    `observe(streams, start)` and the return is `(logits, streams of the last token)` (the MTP
    drafter reads them).
    """
    check_token_ids(ids, model.args.vocab_size)
    head, streams = list(ids[:-1]), observe is not None
    kw = {"last_only": True, **({"return_streams": True} if streams else {})}
    start, offset = 0, cache[0].offset
    while start < len(head):
        end = min(len(head), start + chunk - (offset + start) % chunk)
        part = head[start:end]
        out = model(mx.array(part)[None], cache, **kw)
        if streams:
            observe(out[1], start)
        # Only the state is evaluated: the head of intermediate chunks is never computed.
        with paced(model.args, len(part), cache[0].offset):
            mx.eval([c.state for c in cache], out[1] if streams else [])
        mx.clear_cache()
        start = end
        if on_chunk:
            on_chunk()
        if progress:
            progress(end, len(ids))
    if on_prefilled:
        on_prefilled()
    out = model(mx.array(list(ids[-1:]))[None], cache, **kw)
    return (out[0][:, -1, :], out[1]) if streams else out[:, -1, :]
