"""The compiled single-token decode step: the whole trunk and head as one `mx.compile` graph.

Eager decode rebuilds ~600 graph nodes per layer per token in Python. Here the step is traced
once per *variant* and replayed: every shape is fixed between pool growth steps, the position
is an array, and what depends on the position in Python is only the variant key. For a token at
position p and a compressor of ratio m, the key holds whether p closes a window
((p + 1) % m == 0), how the layer reads its pool (none yet, dense, or through the indexer's
top-k) and a power-of-two *bucket* of pool rows it reads; rows past the live count are masked,
not sliced away, so a bucket serves many tokens. All layers share p, so the key is per model.

The maths is the eager path's (`attention.py`, `model.py`) for one token; state arrays go in
and come back updated by `slice_update`, which MLX performs in place once the cache drops the
old reference. Window keys are attended in ring order: the softmax does not care about order.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from . import kernels, mhc
from .attention import _attend, project_f32, rope
from .cache import CompressorState, LayerCache
from .head import embed_streams, head_logits
from ..config import CSA, HCA

F32 = mx.float32
MIN_BUCKET = 64  # pool rows read at the least; a bucket doubles as the pool fills


def supported(model, cache: list[LayerCache], ids: mx.array) -> bool:
    """The compiled step covers one new token per sequence with all layers at one offset."""
    return len(cache) == len(model.layers) and one_token(cache, ids)


def one_token(cache: list[LayerCache], ids: mx.array) -> bool:
    """One new token per sequence, every layer of `cache` at one offset."""
    if ids.ndim != 2 or ids.shape[1] != 1 or not cache:
        return False
    offset = cache[0].offset
    # The step derives each pool's count from the offset; a cache where they disagree (filled
    # by hand, say) decodes eagerly rather than wrongly.
    return all(c.offset == offset and (c.kv_pool is None or c.kv_pool.n == offset // c.ratio)
               for c in cache)


def _bucket(n: int, capacity: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, capacity)


def plan(model, cache: list[LayerCache], p: int) -> tuple:
    """Per layer (ratio, close, mode, bucket, pool quantization) for the token at position p;
    grows pools first. The quantization is None or (`pool_quant` of the KV pool, of the index
    pool), so 8-bit pools (`--kv-bits 8`) trace their own variants."""
    topk = model.args.index_topk
    key = []
    for c in cache:
        m = c.ratio
        if not m:
            key.append((0, False, None, 0, None))
            continue
        n = (p + 1) // m  # entries after this token: pools hold floor(offset / m) rows
        close = (p + 1) % m == 0
        if close:
            c.kv_pool.reserve(1)
            if c.index_pool is not None:
                c.index_pool.reserve(1)
        mode = None if n == 0 else ("dense" if c.kind == HCA or n <= topk else "sparse")
        pools = [c.kv_pool] + ([c.index_pool] if c.index_pool is not None else [])
        quant = None if c.kv_pool.bits is None else tuple(pool_quant(q) for q in pools)
        key.append((m, close, mode, _bucket(n, c.kv_pool.capacity) if n else 0, quant))
    return tuple(key)


def _compressor_arrays(state: CompressorState) -> list[mx.array]:
    return list(state.arrays().values())


POOL_KEYS = ("data", "scales", "biases")  # an 8-bit pool has all three, a plain one data only


def state_arrays(c: LayerCache) -> list[mx.array]:
    """The arrays one layer's step reads and rewrites, in a fixed order."""
    out = [c.window.keys]
    if c.ratio:
        out += _compressor_arrays(c.compressor) + [c.kv_pool.arrays[k] for k in POOL_KEYS
                                                   if k in c.kv_pool.arrays]
    if c.kind == CSA:
        out += _compressor_arrays(c.indexer) + [c.index_pool.arrays[k] for k in POOL_KEYS
                                                if k in c.index_pool.arrays]
    return out


def set_state(c: LayerCache, arrays: list[mx.array], close: bool):
    it = iter(arrays)
    c.window.keys = next(it)
    parts = [(c.compressor, c.kv_pool)] if c.ratio else []
    if c.kind == CSA:
        parts.append((c.indexer, c.index_pool))
    for comp, pool in parts:
        for name in comp.arrays():
            setattr(comp, name, next(it))
        pool.arrays = {k: next(it) for k in POOL_KEYS if k in pool.arrays}
        pool.n += int(close)
    c.offset += 1


def _compress(comp, kv, gate, st: list[mx.array], p, close: bool, periods, dtype):
    """One token's projections `kv`, `gate` into a compressor's rows; with `close`, also the
    window's entry `[B, 1, w]`."""
    m, c = comp.ratio, comp.width
    r = p % m
    gate = gate + comp.ape.astype(F32)[r]
    st = list(st)
    st[0] = mx.slice_update(st[0], kv, r.reshape(1), axes=(1,))
    st[1] = mx.slice_update(st[1], gate, r.reshape(1), axes=(1,))
    if not close:
        return None, st
    kv, gate = st[0][:, None], st[1][:, None]  # the m rows of the window that closes: [B,1,m,k*w]
    if comp.overlap:
        # The entry pools the carry half of the previous window with this window's own half.
        kv = mx.concatenate([st[2][:, None], kv[..., c:]], axis=2)
        gate = mx.concatenate([st[3][:, None], gate[..., c:]], axis=2)
        st[2], st[3] = st[0][..., :c], st[1][..., :c]
    w = mx.softmax(gate, axis=2, precise=True)
    entry = comp.norm((w * kv).sum(axis=2).astype(dtype))
    return rope(entry, periods, p // m, scale=m), st


def pool_quant(pool) -> tuple | None:
    """(mode, group, bits) of a quantized pool, None for a plain one."""
    return None if pool.bits is None else (pool.mode, pool.group, pool.bits)


def pool_arrays(quant) -> int:
    """Arrays a pool holds: data, then scales and (affine) biases when quantized."""
    return 1 if quant is None else (3 if quant[0] == "affine" else 2)


def append_entry(pool: list[mx.array], entry, at, quant) -> list[mx.array]:
    """Write a closed window's entry at row `at` (quantized like the pool's rows)."""
    if entry is None:
        return pool
    if quant is None:
        rows = [entry.astype(pool[0].dtype)]
    else:
        rows = mx.quantize(entry, quant[1], quant[2], mode=quant[0])
    return [mx.slice_update(a, r, at.reshape(1), axes=(1,)) for a, r in zip(pool, rows)]


def pool_rows(pool: list[mx.array], quant, dtype, bucket: int | None = None, idx=None) -> mx.array:
    """Pool rows as `dtype`: the first `bucket`, or per-query picks `idx [B, S, K]`."""
    if idx is not None:
        pool = [mx.take_along_axis(a[:, None], idx[..., None], axis=2) for a in pool]
    else:
        pool = [a[:, :bucket] for a in pool]
    if quant is None:
        return pool[0].astype(dtype)
    mode, group, bits = quant
    biases = pool[2] if len(pool) > 2 else None
    return mx.dequantize(pool[0], pool[1], biases, group_size=group, bits=bits, mode=mode).astype(dtype)


def project(att, x, p):
    """Roped queries `[B, H, 1, c]`, the roped KV row `[B, 1, c]` and the side projections for
    tokens at positions `p` (a scalar, or one per row `[B]`: `mx.fast.rope` takes either)."""
    B = x.shape[0]
    q_lat = att.q_norm(att.wq_a(x))
    q = att.wq_b(q_lat).reshape(B, 1, att.n_heads, att.head_dim)
    q = rope(mx.fast.rms_norm(q, None, att.eps).transpose(0, 2, 1, 3), att._periods, p)
    kv = rope(att.kv_norm(att.wkv(x)), att._periods, p)
    return q, kv, side_projections(att, x, q_lat)


def side_projections(att, x, q_lat) -> list[mx.array]:
    """The compressors' and the indexer's projections of the token (they read weights, not
    state): compressor kv and gate, then for CSA the indexer's compressor kv and gate, its
    queries and head weights. A step that never reads one (no sparse read yet) drops it."""
    if not att.ratio:
        return []
    comps = [att.compressor] + ([att.indexer.compressor] if att.kind == CSA else [])
    out = [project_f32(lin, x) for comp in comps for lin in (comp.wkv, comp.wgate)]
    if att.kind == CSA:
        out += [att.indexer.wq_b(q_lat), att.indexer.weights_proj(x)]
    return out


def core(att, q, kv, side: list[mx.array], st: list[mx.array], p, spec, ar):
    """Everything that reads or writes one layer's state, for tokens all at position `p`:
    the fp32 attention output `[B, H, 1, c]` (not yet inverse-roped) and the new state."""
    m, close, mode, bucket, quant = spec
    c, W, dtype = att.head_dim, att.window, kv.dtype
    ring = mx.slice_update(st[0], kv, (p % W).reshape(1), axes=(1,))
    out = [ring]
    parts = [(ring.astype(F32), (ar(W) <= p)[None], False)]
    if m:
        n_before = (p + 1) // m - int(close)
        n = n_before + int(close)
        qkv, qix = (*quant, None)[:2] if quant else (None, None)
        width = pool_arrays(qkv)  # arrays per pool
        ncomp = 4 if att.compressor.overlap else 2
        i = 1 + ncomp
        entry, comp = _compress(att.compressor, *side[:2], st[1:i], p, close, att._periods, dtype)
        pool = append_entry(st[i : i + width], entry, n_before, qkv)
        out += comp + pool
        if att.kind == CSA:
            i += width
            ientry, icomp = _compress(att.indexer.compressor, *side[2:4], st[i : i + 4], p, close,
                                      att._index_periods, dtype)
            ipool = append_entry(st[i + 4 : i + 4 + width], ientry, n_before, qix)
            out += icomp + ipool
        if mode == "dense":
            parts.append((pool_rows(pool, qkv, F32, bucket), (ar(bucket) < n)[None], False))
        elif mode == "sparse":
            keys = pool_rows(ipool, qix, dtype, bucket)
            idx = _select(att.indexer, *side[4:6], keys, n, p, att._index_periods, ar)
            parts.append((pool_rows(pool, qkv, F32, idx=idx), None, True))
    return _attend(q.astype(F32) * c**-0.5, parts, att.attn_sink), out


def output(att, o, p, dtype):
    """Inverse rope at positions `p` (scalar or `[B]`) and the grouped output projection."""
    B = o.shape[0]
    o = rope(o.astype(dtype), att._periods, p, inverse=True)
    o = o.transpose(0, 2, 1, 3).reshape(B, 1, att.groups, -1)
    return att.wo_b(att.wo_a(o).reshape(B, 1, -1))


def _attention(att, x, st: list[mx.array], p, spec, ar):
    q, kv, side = project(att, x, p)
    o, out = core(att, q, kv, side, st, p, spec, ar)
    return output(att, o, p, x.dtype), out


def _select(ix, q, w, keys, n, p, periods, ar):
    """The indexer's top-k over the first `bucket` index keys, of which `n` are live, from its
    query projection `q` and head-weight projection `w` of the token."""
    B, rows = q.shape[0], keys.shape[1]
    q = q.reshape(B, 1, ix.n_heads, ix.head_dim).transpose(0, 2, 1, 3)
    q = rope(q, periods, p)  # [B, H_I, 1, c_I]
    w = w.astype(F32) * (ix.head_dim * ix.n_heads) ** -0.5  # [B, 1, H_I]
    z = q[:, :, 0] @ keys.astype(q.dtype).swapaxes(1, 2)  # [B, H_I, rows]
    z = mx.maximum(z.astype(F32), 0)
    scores = (w[..., None] * z[:, None]).sum(axis=2)  # [B, 1, rows]
    scores = mx.where(ar(rows) < n, scores, -mx.inf)
    return mx.argpartition(-scores, ix.topk - 1, axis=-1)[..., : ix.topk]


def block_step(block, X, ids, st, p, spec, ar):
    x, post, comb = block._mix(X, "attn")
    y, st = _attention(block.attn, block.attn_norm(x), st, p, spec, ar)
    X = mhc.expand(y, X, post, comb)
    x, post, comb = block._mix(X, "ffn")
    return mhc.expand(block.ffn(block.ffn_norm(x), ids), X, post, comb), st


class DecodeStep:
    """Compiled steps of one model, one per variant key, built on first use.

    The model's weights are captured when a variant is traced; reloading weights into the same
    model object needs a new `DecodeStep`. Subclasses step other runs of layers (a pipeline
    stage) by overriding `_blocks`, `_begin` and `_end`.
    """

    def __init__(self, model):
        self.model = model
        self.steps: dict[tuple, object] = {}
        self._aranges: dict[int, mx.array] = {}
        # The streams input of a step that embeds its ids: one evaluated empty array, not a new
        # array (and a kernel) per token.
        self.no_streams = mx.zeros((0,))
        mx.eval(self.no_streams)
        a = model.args
        kernels.prepare(a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps)  # its check cannot run in a trace
        # A trace can only capture evaluated arrays (a lazily loaded model has none yet).
        mx.eval(model.parameters())

    def _ranges(self, specs) -> Callable[[int], mx.array]:
        """The look-up of the `arange`s a trace of these layer variants reads (the window, each
        bucket), evaluated before tracing so the graph captures constants, not Arange kernels."""
        for n in {self.model.args.sliding_window} | {spec[3] for spec in specs if spec[3]}:
            if n not in self._aranges:
                self._aranges[n] = mx.arange(n)
                mx.eval(self._aranges[n])
        return self._aranges.__getitem__

    def _blocks(self) -> list:
        return self.model.layers

    def _begin(self, ids: mx.array, X: mx.array) -> mx.array:
        """The streams entering the first block: the embedded ids, broadcast to the N streams."""
        return embed_streams(self.model, ids)

    def _end(self, X: mx.array) -> tuple:
        """What a step returns besides the state: fp32 logits and the final streams."""
        return head_logits(self.model, X), X

    def _build(self, key: tuple, sizes: tuple[int, ...]):
        ar = self._ranges(key)
        blocks = self._blocks()

        def step(ids, p, X, *flat):
            X = self._begin(ids, X)
            new, i = [], 0
            for layer, size, spec in zip(blocks, sizes, key):
                X, st = block_step(layer, X, ids, list(flat[i : i + size]), p, spec, ar)
                new += st
                i += size
            return (*self._end(X), *new)

        return mx.compile(step)

    def run(self, ids: mx.array, X: mx.array, cache: list[LayerCache]) -> tuple:
        """Replay the variant for `cache`'s position (tracing it on first use), advance the
        cache by one token and return what `_end` returns."""
        p = cache[0].offset
        key = plan(self.model, cache, p)
        layouts = [state_arrays(c) for c in cache]
        sizes = tuple(len(a) for a in layouts)
        if key not in self.steps:
            self.steps[key] = self._build(key, sizes)
        flat = [a for arrays in layouts for a in arrays]
        del layouts
        out = self.steps[key](ids, mx.array(p, mx.int32), X, *flat)
        # Only the graph may hold the old state now, so its slice updates run in place.
        del flat
        n = len(out) - sum(sizes)
        i = n
        for c, size, spec in zip(cache, sizes, key):
            set_state(c, list(out[i : i + size]), spec[1])
            i += size
        return out[:n]

    def __call__(self, ids: mx.array, cache: list[LayerCache]):
        """Logits `[B, 1, V]` (fp32) and the final streams for one token per sequence."""
        return self.run(ids, self.no_streams, cache)
