"""The DeepSeek-V4.1 network (spec §1.6), built from V4's pieces.

Shared with V4 unchanged: the MoE (router without hash layers), RMSNorm, the grouped output
projection, RoPE tables, the window ring, compressor rows and entry pools (`cache.py`), the
window-plus-entries attention with sinks (`attention._attend`), and the mHC maths (`mhc.py`).
What V4.1 changes lives here:

- queries: no per-head norm (only the low-rank latent is normalised);
- compressed pools only on kv-source layers (ratio 2: two tokens pooled by a softmax gate, no
  positional bias, no overlap; ratio 1: one normalised projection per token), attended by the
  later layers of the same ratio; index keys are projected from the owner's compressed latent
  (`indexer.wk`, `indexer.k_norm`); the top-k is picked by index-source layers and reused by the
  layers after them; index sources after the candidate source score only the blocks it picked
  (the two-level selection);
- lagged mHC: a sublayer collapses the streams with the `pre` weights its predecessor computed
  (the first one with stream 0 alone), and there is no HyperHead: the last `pre` collapses;
- Engram layers add hashed n-gram memory before their block (`engram.py`);
- the QAT roundings of `fakequant.py`.

What one layer hands to later ones within a forward (the owner's pools, the top-k, the
candidate blocks) travels in a `Handoff`, never in the modules. `Model41(ids, cache)` maps ids
`[B, S]` to fp32 logits like `model.Model`; one-token steps replay the compiled graphs of
`v41_decode.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import engram as engram_mod
from . import fakequant as fq
from . import mhc
from .attention import (QUERY_BLOCK, SPARSE_QUERY_BLOCK, _attend, _visible_entries, _window_part, init_projections,
                        project_f32, rope, windows)
from .cache import CompressorState, LayerCache, make_cache
from ..config import ModelArgs
from .layers import RMSNorm
from .head import embed_streams, first_pre, head41
from .model import MoE, init_sites
from .v41_select import among_candidates, candidate_top, score, top_k

# Bytes of index scores `[Bq, H_I, entries]` one block may hold (as attention.INDEX_SCORE_BYTES).
INDEX_SCORE_BYTES = 1 << 28


@dataclass
class Handoff:
    """Within one forward: the pool owners' caches, each index source's top-k `(idx, valid)`
    per query (None while every entry fits the top-k), and the candidate source's block mask."""

    pools: dict[int, LayerCache] = field(default_factory=dict)
    topk: dict[int, tuple | None] = field(default_factory=dict)
    candidates: tuple | None = None  # (blocks, reachable) `[B, S, k]`, see candidate_top


class Compressor41(nn.Module):
    """A kv source's compressor: one normalised latent per `ratio` tokens, before RoPE (the
    index keys are projected from the unrotated latent)."""

    def __init__(self, args: ModelArgs, ratio: int):
        super().__init__()
        D, c = args.hidden_size, args.head_dim
        self.ratio = ratio
        self.wkv = nn.Linear(D, c, bias=False)
        if ratio > 1:
            self.wgate = nn.Linear(D, c, bias=False)
        self.norm = RMSNorm(c, args.rms_norm_eps)

    def __call__(self, x: mx.array, state: CompressorState | None, offset: int) -> mx.array:
        """Latents `[B, n, c]` of the windows that close among tokens offset…offset+S-1."""
        if self.ratio == 1:
            return self.norm(self.wkv(x))
        kv, gate = windows(project_f32(self.wkv, x), project_f32(self.wgate, x), state, offset,
                           self.ratio)
        if kv is None:
            return mx.zeros((x.shape[0], 0, self.wkv.weight.shape[0]), x.dtype)
        pooled = (mx.softmax(gate, axis=2, precise=True) * kv).sum(axis=2)
        return self.norm(pooled.astype(x.dtype))


class Indexer41(nn.Module):
    """An index source's scorer: top-k entries of its pool per query; index keys on the owner."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.ratio = args.compress_ratio(layer)
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        if args.owns_pool(layer):
            self.wk = nn.Linear(args.head_dim, self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.is_candidate_source = layer == args.candidate_source_layer_id
        self.uses_candidates = args.uses_candidates(layer)
        self.blocks, self.block_size = args.candidate_topk_blocks, args.candidate_block_size

    def keys(self, latent: mx.array, periods: mx.array, first: int) -> mx.array:
        """Index keys of the latents of entries first, first+1, … (rope at entry * ratio)."""
        k = rope(self.k_norm(self.wk(latent)), periods, first, scale=self.ratio)
        return fq.index_qk(k)

    def queries(self, x: mx.array, q_lat: mx.array, periods: mx.array, offset):
        """Roped, rounded index queries `[B, S, H_I, c_I]` and head weights `[B, S, H_I]`."""
        B, S, _ = x.shape
        q = self.wq_b(fq.linear_input(q_lat)).reshape(B, S, self.n_heads, self.head_dim)
        q = rope(q.transpose(0, 2, 1, 3), periods, offset).transpose(0, 2, 1, 3)
        w = self.weights_proj(x) * (self.head_dim**-0.5 * self.n_heads**-0.5)
        return fq.index_qk(q), w

    def select(self, x, q_lat, keys, offset: int, periods, candidates):
        """`(idx, valid)` `[B, S, K]` for queries at offset…offset+S-1, and the candidate blocks
        this layer picks (the candidate source) or None. An index source after the candidate
        source scores only the candidate blocks' keys (`among_candidates`)."""
        B, S, _ = x.shape
        n = keys.shape[1]
        q, w = self.queries(x, q_lat, periods, offset)
        limit = (mx.arange(offset, offset + S) + 1) // self.ratio  # entries each query sees
        if self.uses_candidates and candidates is not None:
            return (*among_candidates(self, q, w, keys, limit[None, :, None], candidates), None)
        step = max(1, INDEX_SCORE_BYTES // (4 * B * S * self.n_heads))
        parts = [score(q, w, keys[:, s0 : s0 + step]) for s0 in range(0, n, step)]
        scores = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        visible = _visible_entries(offset, S, n, self.ratio)
        if visible is not None:
            scores = mx.where(visible, scores, -mx.inf)
        picked = None
        if self.is_candidate_source:
            picked = candidate_top(scores, limit, self.blocks, self.block_size)[:2]
        idx = top_k(scores, min(self.topk, n))
        valid = mx.take_along_axis(scores, idx, axis=-1) > -mx.inf
        return idx, valid, picked


class Attention41(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, c = args.num_attention_heads, args.head_dim
        self.layer, self.n_heads, self.head_dim, self.window = layer, H, c, args.sliding_window
        self.groups, self.ratio = args.o_groups, args.compress_ratio(layer)
        self.pool_source, self.index_source = args.pool_source(layer), args.index_source(layer)
        self.topk = args.index_topk
        init_projections(self, args, layer)
        if args.owns_pool(layer):
            self.compressor = Compressor41(args, self.ratio)
        if layer in args.index_source_layer_ids:
            self.indexer = Indexer41(args, layer)

    @property
    def owner(self) -> bool:
        return "compressor" in self

    def publish(self, x: mx.array, cache: LayerCache, p0: int) -> None:
        """A pool owner: compress this chunk's closed windows into entries and index keys."""
        latent = self.compressor(x, cache.compressor, p0)
        if latent.shape[1]:
            first = p0 // self.ratio  # entry index of the first window that closes here
            entries = rope(latent, self._periods, first, scale=self.ratio)
            cache.kv_pool.append(fq.compressed_kv(entries))
            cache.index_pool.append(self.indexer.keys(latent, self._index_periods, first))

    def project(self, x: mx.array, p0):
        """Roped queries `[B, H, S, c]`, the latent for the indexer and the rounded, roped KV rows."""
        B, S, _ = x.shape
        xq = fq.linear_input(x)
        q_lat = self.q_norm(self.wq_a(xq))
        q = self.wq_b(fq.linear_input(q_lat)).reshape(B, S, self.n_heads, self.head_dim)
        q = rope(q.transpose(0, 2, 1, 3), self._periods, p0)
        kv = fq.window_kv(rope(self.kv_norm(self.wkv(xq)), self._periods, p0))
        return q, q_lat, kv

    def out(self, o: mx.array, p0, dtype) -> mx.array:
        """Inverse rope of the fp32 head outputs `[B, H, S, c]`, then the output projections."""
        B, S = o.shape[0], o.shape[2]
        o = rope(o.astype(dtype), self._periods, p0, inverse=True)
        o = o.transpose(0, 2, 1, 3).reshape(B, S, self.groups, -1)
        return self.wo_b(fq.linear_input(self.wo_a(o).reshape(B, S, -1)))

    def __call__(self, x: mx.array, cache: LayerCache, handoff: Handoff) -> mx.array:
        B, S, _ = x.shape
        c, W, p0, dtype = self.head_dim, self.window, cache.offset, x.dtype
        q, q_lat, kv = self.project(x, p0)
        window = mx.concatenate([cache.window.ordered(p0), kv], axis=1).astype(mx.float32)
        cache.window.write(kv, p0)
        n, pool = 0, None
        if self.ratio:
            if self.owner:
                self.publish(x, cache, p0)
                handoff.pools[self.layer] = cache
            pool = handoff.pools[self.pool_source]
            n = pool.kv_pool.n
        dense = n and n <= self.topk  # every visible entry is in the top-k: attend to all
        if n and not dense and "indexer" in self:
            handoff.topk[self.layer] = self._select(x, q_lat, pool, p0, handoff)
        topk = handoff.topk.get(self.index_source) if n and not dense else None
        keys = pool.kv_pool.keys(mx.float32) if dense else None

        outs = []
        step = SPARSE_QUERY_BLOCK if topk is not None else QUERY_BLOCK
        for i0 in range(0, S, step):
            i1 = min(S, i0 + step)
            qb, wb = q[:, :, i0:i1], window
            if outs:  # block after block, as attention.py: MLX would otherwise hold them all
                qb, wb = mx.depends([qb, wb], outs[-1])
            parts = [_window_part(wb, p0, i0, i1, W)]
            if dense:
                parts.append((keys, _visible_entries(p0 + i0, i1 - i0, n, self.ratio), False))
            elif topk is not None:
                idx, valid = topk[0][:, i0:i1], topk[1][:, i0:i1]
                parts.append((pool.kv_pool.gather(idx, mx.float32), valid, True))
            o = _attend(qb.astype(mx.float32) * c**-0.5, parts, self.attn_sink)
            outs.append(self.out(o, p0 + i0, dtype))
        cache.offset += S
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def _select(self, x, q_lat, pool: LayerCache, p0: int, handoff: Handoff):
        """Top-k of every query of the chunk, in query blocks (the scores of one block only)."""
        S = x.shape[1]
        keys = pool.index_pool.keys(x.dtype)
        idx, valid, picked = [], [], []
        for i0 in range(0, S, SPARSE_QUERY_BLOCK):
            i1 = min(S, i0 + SPARSE_QUERY_BLOCK)
            cand = None if handoff.candidates is None else tuple(a[:, i0:i1] for a in handoff.candidates)
            a, b, c = self.indexer.select(x[:, i0:i1], q_lat[:, i0:i1], keys, p0 + i0,
                                          self._index_periods, cand)
            idx.append(a)
            valid.append(b)
            picked.append(c)
        join = (lambda a: a[0] if len(a) == 1 else mx.concatenate(a, axis=1))  # noqa: E731
        if self.indexer.is_candidate_source:
            handoff.candidates = (join([c[0] for c in picked]), join([c[1] for c in picked]))
        return join(idx), join(valid)


class Block41(nn.Module):
    """One V4.1 decoder block: [Engram], then mHC-lagged attention and MoE (see the module doc)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        init_sites(self, args)
        self.attn = Attention41(args, layer)
        self.ffn = MoE(args, layer)
        for part in (self.ffn.experts, self.ffn.shared_experts):
            part.round_inputs = fq.linear_input
        if args.is_engram_layer(layer):
            self.engram = engram_mod.Engram(args, layer)
        self._hc = (args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)

    def coeffs(self, X: mx.array, site: str):
        fn, base, scale = (getattr(self, f"hc_{site}_{p}") for p in ("fn", "base", "scale"))
        return mhc.coeffs(X, fn, base, scale, *self._hc)

    def __call__(self, X, pre, ids, cache: LayerCache, handoff: Handoff, rows=None):
        """(streams, `pre` of the next sublayer) after this block."""
        if "engram" in self:
            X = self.engram(X, rows)
        attn_pre, post, comb = self.coeffs(X, "attn")
        y = self.attn(self.attn_norm(mhc.collapse(X, pre)), cache, handoff)
        X = mhc.expand(y, X, post, comb)
        ffn_pre, post, comb = self.coeffs(X, "ffn")
        X = mhc.expand(self.ffn(self.ffn_norm(mhc.collapse(X, attn_pre)), ids), X, post, comb)
        return X, ffn_pre


class Model41(nn.Module):
    """DeepSeek-V4.1's text model: ids `[B, S]` -> fp32 logits `[B, S, V]`; state in the cache.

    `engram_hash` (an `engram.EngramHash`, set by the loader) and each Engram layer's `table`
    are plain attributes, not parameters. There is no MTP block (`mtp` is empty): the release's
    next-n layers are DSpark draft stages, which are not converted.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block41(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = []
        self.compiled_decode = True
        self._decode_step = None
        self.engram_hash = None

    def fuse(self):
        for block in self.layers:
            block.ffn.experts.fuse()
            block.ffn.shared_experts.fuse()
            mx.clear_cache()
        self._decode_step = None

    @property
    def dtype(self) -> mx.Dtype:
        return self.embed["scales"].dtype if "scales" in self.embed else self.embed.weight.dtype

    def batch_step(self):
        """Batched one-token steps (v41_decode.BatchStep41: the layer handoff needs its own)."""
        from .v41_decode import BatchStep41

        return BatchStep41(self)

    def engram_rows(self, ids: mx.array, cache: list[LayerCache]) -> dict[int, mx.array]:
        return engram_mod.engram_rows(self, range(len(self.layers)), ids, cache)

    def __call__(self, ids: mx.array, cache: list[LayerCache] | None = None,
                 last_only: bool = False, return_streams: bool = False):
        """Logits `[B, S, V]` (fp32) for token ids `[B, S]`; advances the cache by S."""
        if cache is None:
            cache = make_cache(self, batch=ids.shape[0])
        from . import v41_decode

        if self.compiled_decode and v41_decode.supported(self, cache, ids):
            if self._decode_step is None:
                self._decode_step = v41_decode.DecodeStep41(self)
            logits, X = self._decode_step(ids, cache)
            return (logits, X) if return_streams else logits
        rows = self.engram_rows(ids, cache)
        X = embed_streams(self, ids)
        pre = first_pre(*ids.shape, self.args.hc_mult)
        handoff = Handoff()
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            X, pre = layer(X, pre, ids, c, handoff, rows.get(i))
        logits = head41(self, X[:, -1:] if last_only else X, pre[:, -1:] if last_only else pre)
        return (logits, X) if return_streams else logits
