"""Scoring a prompt: for each of its tokens after the first, log P(token | the tokens before it)
and the `top` most likely tokens at that position.

Generation reads a prompt for its last position only; scoring needs the head at every position,
so it is a second pass over the prompt, with a cache of its own (a session's cache and the
prompt cache are untouched). The prompt is fed in chunks, as `prefill` feeds it, and only one
chunk's fp32 logits `[chunk, V]` are alive at a time: each chunk is reduced to its logprobs and
top tokens before the next is fed, never a whole prompt's `[S, V]`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import mlx.core as mx

from ..model.cache import make_cache
from .pacing import paced
from .prefill import check_token_ids

Scored = tuple[float, list[tuple[int, float]]]  # (logprob of the token, [(token, logprob)] best first)


def prompt_logprobs(model, ids: Sequence[int], top: int = 0, *, chunk: int = 512,
                    kv_bits: int | None = None) -> Iterator[list[Scored]]:
    """For each chunk fed, the entries of the tokens it predicts: `ids[1:]` in order, in lists
    of at most `chunk` (all together: one entry per token after the first). Chunks end at
    multiples of `chunk`, as prefill's do; where they end does not change the numbers."""
    ids = list(ids)
    check_token_ids(ids, model.args.vocab_size)
    if len(ids) < 2:
        return
    cache = make_cache(model, max_tokens=len(ids), kv_bits=kv_bits)
    head = ids[:-1]  # the last token predicts nothing in the prompt
    for start in range(0, len(head), chunk):
        part = head[start : start + chunk]
        logits = model(mx.array(part)[None], cache)[0]  # [n, V] fp32
        norm = mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(ids[start + 1 : start + 1 + len(part)])[:, None]
        chosen = (mx.take_along_axis(logits, targets, axis=-1) - norm)[:, 0]
        out = [chosen]
        if top:
            k = min(top, logits.shape[-1])
            best = mx.argpartition(logits, -k, axis=-1)[:, -k:]
            values = mx.take_along_axis(logits, best, axis=-1)
            order = mx.argsort(-values, axis=-1)
            out += [mx.take_along_axis(best, order, axis=-1),
                    mx.take_along_axis(values, order, axis=-1) - norm]
        # The chunk's logits come on top of the planned working set: past the limit MLX waits
        # for queued work before it queues more, it never refuses.
        with paced(model.args, len(part), cache[0].offset):
            mx.eval(out, [c.state for c in cache])
        del logits, norm
        mx.clear_cache()
        lps = out[0].tolist()
        tops = ([list(zip(i, v)) for i, v in zip(out[1].tolist(), out[2].tolist())] if top
                else [[] for _ in lps])
        yield list(zip(lps, tops))
