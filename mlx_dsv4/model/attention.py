"""Attention of one DeepSeek-V4 layer: everything that reads or writes the layer's pools.

Owns the common path of spec §2.5 (low-rank queries, one shared KV head used as key and value,
partial interleaved RoPE on the last dims, sinks, inverse RoPE of the output, grouped low-rank
output projection), the compressor of §2.6, the Lightning Indexer of §2.8 and the assembly of
window + compressed keys of §2.7. The state itself lives in `cache.LayerCache`.

Queries of a chunk are processed in blocks of `QUERY_BLOCK` so a prefill chunk never builds a
score tensor over the whole chunk: the window part then costs `[H, Bq, W]` (each query against
its own W keys) and the indexer `[Bq, T/4]` per block, whatever the chunk size; each block's
output is projected back to the hidden size before the next.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import CompressorState, LayerCache
from ..config import CSA, HCA, ModelArgs
from .layers import GroupedLinear, RMSNorm

QUERY_BLOCK = 64  # per block: per-query window and top-k keys [Bq, W + k, c] in fp32
# Where each query gathers its own top-k entries ([Bq, k, c], 32 MiB in fp32 at 32 queries).
SPARSE_QUERY_BLOCK = 32
# Upper bound for one block of indexer scores [Bq, H_I, entries] in fp32. A lower cap did not
# lower the measured peak (a query block's score blocks are alive together until top-k).
INDEX_SCORE_BYTES = 1 << 28


def rope_periods(inv_freq: list[float], dim: int) -> mx.array:
    """Periods for `mx.fast.rope` over all `dim` features, rotating only the last pairs.

    `mx.fast.rope` rotates the leading dims and reads `freqs` as periods; an infinite period
    is a zero angle, so the leading (no-position) pairs pass through unchanged.
    """
    lead = dim // 2 - len(inv_freq)
    return mx.array([math.inf] * lead + [1.0 / f for f in inv_freq], dtype=mx.float32)


def rope(x: mx.array, periods: mx.array, offset: int, scale: float = 1.0, inverse: bool = False):
    """Interleaved RoPE along axis -2 at positions (offset + t) * scale."""
    freqs = -periods if inverse else periods
    return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=scale, offset=offset,
                        freqs=freqs)


def project_f32(linear: nn.Module, x: mx.array) -> mx.array:
    # The reference runs compressor projections in fp32; we multiply in the weight's dtype
    # (bf16 as shipped) and pool in fp32, as transformers does.
    if "scales" in linear:
        return linear(x).astype(mx.float32)
    w = linear.weight
    return (x.astype(w.dtype) @ w.T).astype(mx.float32)


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry (spec §2.6); CSA windows overlap by a half."""

    def __init__(self, dim: int, ratio: int, width: int, eps: float):
        super().__init__()
        self.ratio, self.width, self.overlap = ratio, width, ratio == 4
        k = 2 if self.overlap else 1
        self.wkv = nn.Linear(dim, k * width, bias=False)
        self.wgate = nn.Linear(dim, k * width, bias=False)
        self.ape = mx.zeros((ratio, k * width))
        self.norm = RMSNorm(width, eps)

    def __call__(self, x: mx.array, state: CompressorState, offset: int, periods: mx.array,
                 dtype: mx.Dtype) -> mx.array:
        """Feed tokens at offset…offset+S-1; return the entries their complete windows emit."""
        B, S, _ = x.shape
        m = self.ratio
        kv = project_f32(self.wkv, x)
        pos = (mx.arange(offset, offset + S) % m).astype(mx.int32)
        gate = project_f32(self.wgate, x) + self.ape.astype(mx.float32)[pos]
        kv, gate = windows(kv, gate, state, offset, m)
        if kv is None:
            return mx.zeros((B, 0, self.width), dtype)
        if self.overlap:
            kv, gate = self._overlap(kv, gate, state)
        weights = mx.softmax(gate, axis=2, precise=True)
        entries = (weights * kv).sum(axis=2)
        # The reference rounds the pooled entry to the activation dtype before its norm.
        entries = self.norm(entries.astype(dtype))
        return rope(entries, periods, offset // m, scale=m)

    def _overlap(self, kv: mx.array, gate: mx.array, state: CompressorState):
        """Entry i pools the carry half of window i-1 with the own half of window i."""
        c = self.width
        carry_kv = mx.concatenate([state.carry_kv[:, None], kv[:, :-1, :, :c]], axis=1)
        carry_gate = mx.concatenate([state.carry_gate[:, None], gate[:, :-1, :, :c]], axis=1)
        state.carry_kv, state.carry_gate = kv[:, -1, :, :c], gate[:, -1, :, :c]
        kv = mx.concatenate([carry_kv, kv[..., c:]], axis=2)
        gate = mx.concatenate([carry_gate, gate[..., c:]], axis=2)
        return kv, gate


def windows(kv: mx.array, gate: mx.array, state: CompressorState, offset: int, m: int):
    """The rows `[B, n, m, k*w]` of the n windows that close among tokens offset…offset+S-1
    (rows of earlier calls come from the state), or (None, None) when none closes; the rows
    of the window left open go into the state, at row p mod m."""
    B, S = kv.shape[:2]
    r = offset % m  # rows of the current window already in the state
    if r + S < m:
        state.kv = mx.slice_update(state.kv, kv, mx.array([r]), axes=(1,))
        state.gate = mx.slice_update(state.gate, gate, mx.array([r]), axes=(1,))
        return None, None
    if r:
        kv = mx.concatenate([state.kv[:, :r], kv], axis=1)
        gate = mx.concatenate([state.gate[:, :r], gate], axis=1)
    n = (r + S) // m
    rest = r + S - n * m
    if rest:
        state.kv = mx.slice_update(state.kv, kv[:, n * m :], mx.array([0]), axes=(1,))
        state.gate = mx.slice_update(state.gate, gate[:, n * m :], mx.array([0]), axes=(1,))
    return kv[:, : n * m].reshape(B, n, m, -1), gate[:, : n * m].reshape(B, n, m, -1)


class Indexer(nn.Module):
    """Lightning Indexer (spec §2.8): picks the top-k compressed entries per query."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, 4, self.head_dim, args.rms_norm_eps)

    def select(self, x: mx.array, q_lat: mx.array, keys: mx.array, offset: int, periods: mx.array):
        """Top-k entry ids `[B, S, k]` and their visibility for queries at offset…offset+S-1.

        `keys` are all index keys emitted so far; entries a query cannot see yet score -inf, so
        a query with fewer visible entries than k gets some invalid picks, flagged False.
        """
        B, S, _ = x.shape
        n = keys.shape[1]
        q = self.wq_b(q_lat).reshape(B, S, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = rope(q, periods, offset).transpose(0, 2, 1, 3)  # [B, S, H_I, c_I]
        scale = (self.head_dim * self.n_heads) ** -0.5
        w = (self.weights_proj(x).astype(mx.float32) * scale)[:, :, None]  # [B, S, 1, H_I]
        keys = keys.astype(q.dtype)
        step = max(1, INDEX_SCORE_BYTES // (4 * B * S * self.n_heads))
        blocks = []
        for s0 in range(0, n, step):
            z = (q.reshape(B, S * self.n_heads, -1) @ keys[:, s0 : s0 + step].swapaxes(1, 2))
            z = mx.maximum(z.reshape(B, S, self.n_heads, -1).astype(mx.float32), 0)
            # The head-weighted sum as a product: no [S, H_I, entries] temporary of w * z.
            blocks.append((w @ z)[:, :, 0])
        scores = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)
        visible = _visible_entries(offset, S, n, 4)
        if visible is not None:
            scores = mx.where(visible, scores, -mx.inf)
        k = min(self.topk, n)
        idx = mx.argpartition(-scores, k - 1, axis=-1)[..., :k]
        valid = mx.take_along_axis(scores, idx, axis=-1) > -mx.inf
        return idx, valid


def _visible_entries(offset: int, S: int, n: int, m: int) -> mx.array | None:
    """[S, n] mask of entries visible to each query (s < floor((t+1)/m)); None if all are."""
    if (offset + 1) // m >= n:
        return None
    limit = (mx.arange(offset, offset + S) + 1) // m
    return mx.arange(n)[None, :] < limit[:, None]


def _attend(q: mx.array, parts: list, sinks: mx.array) -> mx.array:
    """One softmax, with the sink in the denominator, over several key blocks.

    q: [B, H, Sq, c] fp32, pre-scaled. Each part is (keys, mask, per_query): shared keys
    `[B, K, c]` with a mask broadcastable to `[Sq, K]`, or per-query keys `[B, Sq, K, c]` with a
    mask `[B, Sq, K]`. Keys double as values. Scores stay in fp32: at head_dim 512 a bf16 score
    loses the precision the softmax needs.
    """
    B, H, Sq, c = q.shape
    scores = []
    for keys, mask, per_query in parts:
        if per_query:
            s = (q.transpose(0, 2, 1, 3) @ keys.swapaxes(-1, -2)).transpose(0, 2, 1, 3)
            if mask is not None:
                mask = mask[:, None]
        else:
            s = (q.reshape(B, H * Sq, c) @ keys.swapaxes(-1, -2)).reshape(B, H, Sq, -1)
        if mask is not None:
            s = mx.where(mask, s, -mx.inf)
        scores.append(s)
    sink = sinks.astype(mx.float32)[None, :, None]
    top = sink
    for s in scores:
        top = mx.maximum(top, s.max(axis=-1))
    denom = mx.exp(sink - top)
    out = None
    for s, (keys, _, per_query) in zip(scores, parts):
        e = mx.exp(s - top[..., None])
        denom = denom + e.sum(axis=-1)
        if per_query:
            o = (e.transpose(0, 2, 1, 3) @ keys).transpose(0, 2, 1, 3)
        else:
            o = (e.reshape(B, H * Sq, -1) @ keys).reshape(B, H, Sq, c)
        out = o if out is None else out + o
    return out / denom[..., None]


def init_projections(module: nn.Module, args: ModelArgs, layer: int):
    """The attention weights V4 and V4.1 share (checkpoint names): low-rank query with its norm,
    the shared KV projection and norm, the grouped output projection, the sinks; RoPE periods."""
    D, H, c = args.hidden_size, args.num_attention_heads, args.head_dim
    module.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
    module.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
    module.wq_b = nn.Linear(args.q_lora_rank, H * c, bias=False)
    module.wkv = nn.Linear(D, c, bias=False)
    module.kv_norm = RMSNorm(c, args.rms_norm_eps)
    module.wo_a = GroupedLinear(H * c // args.o_groups, args.o_lora_rank, args.o_groups)
    module.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, D, bias=False)
    module.attn_sink = mx.zeros((H,))
    inv_freq = args.rope_inv_freq(layer)
    module._periods = rope_periods(inv_freq, c)
    module._index_periods = rope_periods(inv_freq, args.index_head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        D, H, c = args.hidden_size, args.num_attention_heads, args.head_dim
        self.n_heads, self.head_dim, self.window = H, c, args.sliding_window
        self.groups, self.eps = args.o_groups, args.rms_norm_eps
        self.kind, self.ratio = args.attention_kind(layer), args.compress_ratio(layer)
        init_projections(self, args, layer)
        if self.ratio:
            self.compressor = Compressor(D, self.ratio, c, args.rms_norm_eps)
        if self.kind == CSA:
            self.indexer = Indexer(args)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        B, S, _ = x.shape
        H, c, W, p0 = self.n_heads, self.head_dim, self.window, cache.offset
        dtype = x.dtype
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).reshape(B, S, H, c)
        q = mx.fast.rms_norm(q, None, self.eps).transpose(0, 2, 1, 3)
        q = rope(q, self._periods, p0)
        kv = rope(self.kv_norm(self.wkv(x)), self._periods, p0)

        # Keys of positions p0-W … p0+S-1: the ring (previous calls) then this chunk.
        window = mx.concatenate([cache.window.ordered(p0), kv], axis=1).astype(mx.float32)
        cache.window.write(kv, p0)
        if self.ratio:
            cache.kv_pool.append(self.compressor(x, cache.compressor, p0, self._periods, dtype))
        if self.kind == CSA:
            cache.index_pool.append(
                self.indexer.compressor(x, cache.indexer, p0, self._index_periods, dtype))
        n = cache.kv_pool.n if self.ratio else 0
        dense = n and (self.kind == HCA or n <= self.indexer.topk)
        # Dense: every visible entry is attended (HCA, or CSA while all entries fit in top-k).
        pool = cache.kv_pool.keys(mx.float32) if dense else None
        index_keys = cache.index_pool.keys(dtype) if n and not dense else None

        outs = []
        step = SPARSE_QUERY_BLOCK if n and not dense else QUERY_BLOCK
        for i0 in range(0, S, step):
            i1 = min(S, i0 + step)
            xb, qlb, qb, wb = x[:, i0:i1], q_lat[:, i0:i1], q[:, :, i0:i1], window
            if outs:
                # Block after block: left independent, MLX may queue every block's gathered
                # keys and scores before the first is consumed, and hold them all.
                xb, qlb, qb, wb = mx.depends([xb, qlb, qb, wb], outs[-1])
            parts = [_window_part(wb, p0, i0, i1, W)]
            if dense:
                parts.append((pool, _visible_entries(p0 + i0, i1 - i0, n, self.ratio), False))
            elif n:
                idx, valid = self.indexer.select(xb, qlb, index_keys, p0 + i0,
                                                 self._index_periods)
                parts.append((cache.kv_pool.gather(idx, mx.float32), valid, True))
            # Project each block's output at once: the fp32 head outputs of the whole chunk
            # [B, H, S, c] are then never held together.
            # Scaled to fp32 per block: no fp32 copy of the whole chunk's queries.
            o = _attend(qb.astype(mx.float32) * c**-0.5, parts, self.attn_sink)
            o = rope(o.astype(dtype), self._periods, p0 + i0, inverse=True)
            o = o.transpose(0, 2, 1, 3).reshape(B, i1 - i0, self.groups, -1)
            outs.append(self.wo_b(self.wo_a(o).reshape(B, i1 - i0, -1)))
        cache.offset += S
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def _window_part(window: mx.array, p0: int, i0: int, i1: int, W: int):
    """Queries i0…i1-1's own W window keys, `[B, Sq, W, c]` (a strided view of E, where E[k]
    holds position p0-W+k), and their validity (positions >= 0), as a per-query part.

    Shared keys E[i0 : i1+W] would score every query against W + Sq keys, half of them masked.
    """
    B, T, c = window.shape
    keys = mx.contiguous(mx.as_strided(window, (B, i1 - i0, W, c), (T * c, c, c, 1), (i0 + 1) * c))
    first = p0 + i0 - W + 1  # position of query i0's first key; each next query starts one later
    if first >= 0:
        return keys, None, True
    mask = (mx.arange(i1 - i0)[:, None] + mx.arange(W)[None, :]) >= -first
    return keys, mask[None], True
