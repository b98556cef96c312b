"""V4.1's two-level top-k selection (spec §1.6): index scores, the candidate blocks of the
first level, the top-k among their keys of the second, with one tie rule for every path.

Shared by the forward (`v41.py`), the compiled step (`v41_decode.py`) and pipeline stages.
"""

from __future__ import annotations

import mlx.core as mx


# Queries at a time when gathering candidate keys ([Bq, k * size, c_I] each).
CANDIDATE_QUERY_BLOCK = 8


def among_candidates(ix, q, w, keys, limit, candidates: tuple, n: int | None = None):
    """The second level of the two-level selection: each query scores the keys of its candidate
    blocks only (a few thousand instead of the whole pool) and keeps the top-k of them, as
    `(entry ids, valid)` `[B, S, K]`. `limit` broadcasts to `[B, S, 1]`: entries visible.
    `keys`: the index keys `[B, n, c]`, or a function of ids `[B, s, K']` giving their rows
    `[B, s, K', c]` (a quantized pool then decodes those rows only) with `n` the rows it has."""
    top, reachable = candidates
    B, S, k = top.shape
    size = ix.block_size
    if not callable(keys):
        n, pool = keys.shape[1], keys
        keys = lambda i: mx.take_along_axis(pool[:, None], i[..., None], axis=2)  # noqa: E731
    ids = (top[..., None] * size + mx.arange(size)).reshape(B, S, k * size)
    live = mx.repeat(reachable, size, axis=-1) & (ids < limit)
    safe = mx.minimum(ids, n - 1)
    picks, oks = [], []
    for s0 in range(0, S, CANDIDATE_QUERY_BLOCK):
        s1 = min(S, s0 + CANDIDATE_QUERY_BLOCK)
        rows = keys(safe[:, s0:s1])  # [B, s, K', c]
        z = (q[:, s0:s1] @ rows.astype(q.dtype).swapaxes(-1, -2))  # [B, s, H, K']
        sc = (mx.maximum(z, 0) * w[:, s0:s1].astype(z.dtype)[..., None]).sum(axis=2)
        sc = mx.where(live[:, s0:s1], sc, -mx.inf)
        local = top_k(sc, ix.topk, ids[:, s0:s1])
        picks.append(mx.take_along_axis(ids[:, s0:s1], local, axis=-1))
        oks.append(mx.take_along_axis(sc, local, axis=-1) > -mx.inf)
    join = (lambda a: a[0] if len(a) == 1 else mx.concatenate(a, axis=1))  # noqa: E731
    return join(picks), join(oks)


def top_k(scores: mx.array, k: int, ids: mx.array | None = None) -> mx.array:
    """Positions of the `k` best scores along the last axis, ties going to the lower id (`ids`,
    the entry or block ids of the positions; by default the positions themselves). A fixed tie
    rule makes every path pick the same set however its candidates are laid out (ReLU'd index
    scores tie at zero), and it is the reference's (a stable sort of the scores)."""
    if ids is None:
        ids = mx.arange(scores.shape[-1])
    bits = (scores.astype(mx.float32) + 0.0).view(mx.uint32)  # + 0.0: -0.0 ranks as 0.0
    ordered = mx.where((bits >> 31) == 1, ~bits, bits | 0x80000000).astype(mx.uint64)
    key = ~((ordered << 32) | (0xFFFFFFFF - ids.astype(mx.uint64)))
    return mx.argpartition(key, k - 1, axis=-1)[..., :k]


def score(q: mx.array, w: mx.array, keys: mx.array) -> mx.array:
    """Index scores `[B, S, n]`: per head ReLU(q . k), weighted by the head weights and summed,
    in the activations' dtype as the reference (bf16 in a real model)."""
    B, S, H, c = q.shape
    z = (q.reshape(B, S * H, c) @ keys.astype(q.dtype).swapaxes(1, 2)).reshape(B, S, H, -1)
    return (mx.maximum(z, 0) * w.astype(z.dtype)[..., None]).sum(axis=2)


def candidate_top(scores: mx.array, limit: mx.array, k: int, size: int):
    """The first level of the two-level selection: per query, the `k` blocks of `size` entries
    with the highest best score, always counting the block of its newest visible entry (it may
    be partly full, so an older full block can outscore it). `(blocks [B, S, k], reachable,
    best [B, S, n_blocks])`: a block with no visible entry is no candidate."""
    n = scores.shape[-1]
    nb = -(-n // size)
    if nb * size != n:
        pad = mx.full((*scores.shape[:-1], nb * size - n), -mx.inf, scores.dtype)
        scores = mx.concatenate([scores, pad], axis=-1)
    best = scores.reshape(*scores.shape[:-1], nb, size).max(axis=-1)
    last = ((limit - 1) // size)[:, None]
    pinned = mx.where(mx.arange(nb)[None] == last, mx.inf, best)
    top = top_k(pinned, min(k, nb))
    return top, mx.take_along_axis(best, top, axis=-1) > -mx.inf, best
