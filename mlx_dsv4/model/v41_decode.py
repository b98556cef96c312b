"""The compiled one-token step of V4.1: decode.py's design applied to the shared pools.

As for V4 (decode.py), the whole trunk and head of one token is one `mx.compile` graph per
*variant*: per layer the ratio, whether this token closes the owner's window, how the pool is
read (none yet, dense, or through the top-k) and a power-of-two bucket of pool rows (rows past
the live count are masked, so a bucket serves many tokens); the fake-quant setting is part of the
key. The cross-layer handoff of a forward (owner pools, top-k, candidate blocks) is a Python
dict while tracing, so it costs nothing at replay. Engram rows are read on the host before the
step (the token must be known there) and enter as inputs; the history they advance is host state.

`BatchStep41` runs one token for sequences at different positions (generation/batch.py): what
reads weights runs once over the batch, what touches a sequence's pools and handoff runs per
sequence through `core`, compiled per (layer, variant).
"""

from __future__ import annotations

import mlx.core as mx

from . import decode, fakequant as fq, mhc
from .attention import _attend, project_f32, rope
from .cache import LayerCache
from .engram import engram_rows
from .head import first_pre, head41
from .v41_select import among_candidates, candidate_top, score, top_k

F32 = mx.float32


def supported(model, cache: list[LayerCache], ids: mx.array) -> bool:
    return len(cache) == len(model.layers) and decode.one_token(cache, ids)


def plan(args, layers, cache: list[LayerCache], p: int) -> tuple:
    """Per layer of `layers` (whose caches `cache` holds, in order) (ratio, owner, close, mode,
    bucket, pool quantizations) for the token at p; owners' pools grow first."""
    key, at = [], {i: k for k, i in enumerate(layers)}
    for i, c in zip(layers, cache):
        m = c.ratio
        if not m:
            key.append((0, False, False, None, 0, None))
            continue
        src = cache[at[args.pool_source(i)]]
        close = (p + 1) % m == 0
        owner = c.kv_pool is not None
        if owner and close:
            c.kv_pool.reserve(1)
            c.index_pool.reserve(1)
        n = (p + 1) // m
        mode = None if n == 0 else ("dense" if n <= args.index_topk else "sparse")
        quant = (decode.pool_quant(src.kv_pool), decode.pool_quant(src.index_pool))
        key.append((m, owner, close, mode, decode._bucket(n, src.kv_pool.capacity) if n else 0, quant))
    return tuple(key)


def state_arrays(c: LayerCache) -> list[mx.array]:
    out = [c.window.keys]
    if c.compressor is not None:
        out += [c.compressor.kv, c.compressor.gate]
    for pool in (c.kv_pool, c.index_pool):
        if pool is not None:
            out += [pool.arrays[k] for k in decode.POOL_KEYS if k in pool.arrays]
    return out


def set_state(c: LayerCache, arrays: list[mx.array], close: bool):
    it = iter(arrays)
    c.window.keys = next(it)
    if c.compressor is not None:
        c.compressor.kv, c.compressor.gate = next(it), next(it)
    for pool in (c.kv_pool, c.index_pool):
        if pool is not None:
            pool.arrays = {k: next(it) for k in decode.POOL_KEYS if k in pool.arrays}
            pool.n += int(close)
    c.offset += 1


def side(att, x, q_lat, p) -> list[mx.array]:
    """What reads weights besides q and kv, for rows whose positions are `p`: an owner's
    compressor projections (ratio 2: kv and gate in fp32; ratio 1: the entry's latent itself),
    an index source's roped, rounded queries and head weights."""
    out = []
    if "compressor" in att:
        comp = att.compressor
        if comp.ratio == 1:
            out.append(comp.norm(comp.wkv(x)))
        else:
            out += [project_f32(comp.wkv, x), project_f32(comp.wgate, x)]
    if "indexer" in att:
        out += list(att.indexer.queries(x, q_lat, att._index_periods, p))
    return out


def core(att, q, kv, sides: list, st: list, p, spec, ar, hand: dict):
    """Everything that reads or writes one layer's state (and the handoff `hand`) for one
    token per row at position `p`: the fp32 head outputs `[B, H, 1, c]` and the new state."""
    m, owner, close, mode, bucket, quant = spec
    c, W, dtype = att.head_dim, att.window, kv.dtype
    ring = mx.slice_update(st[0], kv, (p % W).reshape(1), axes=(1,))
    out, parts = [ring], [(ring.astype(F32), (ar(W) <= p)[None], False)]
    if m:
        i = 0
        if owner:
            comp, k = att.compressor, 1
            if m == 1:
                latent, i = sides[0], 1
            else:
                r = (p % m).reshape(1)
                rows = [mx.slice_update(st[1], sides[0], r, axes=(1,)),
                        mx.slice_update(st[2], sides[1], r, axes=(1,))]
                out += rows
                k, i = 3, 2
                latent = None
                if close:
                    w = mx.softmax(rows[1], axis=1, precise=True)
                    latent = comp.norm((w * rows[0]).sum(axis=1, keepdims=True).astype(dtype))
            n_before = (p + 1) // m - int(close)
            npool, nipool = (decode.pool_arrays(q) for q in quant)
            pool, ipool = st[k : k + npool], st[k + npool : k + npool + nipool]
            if latent is not None:
                first = p // m
                entry = fq.compressed_kv(rope(latent, att._periods, first, scale=m))
                pool = decode.append_entry(pool, entry, n_before, quant[0])
                ipool = decode.append_entry(ipool, att.indexer.keys(latent, att._index_periods, first),
                                n_before, quant[1])
            out += pool + ipool
            hand[("pool", att.layer)] = (pool, ipool)
        pool, ipool = hand[("pool", att.pool_source)]
        n = (p + 1) // m
        if mode == "dense":
            parts.append((decode.pool_rows(pool, quant[0], F32, bucket), (ar(bucket) < n)[None], False))
        elif mode == "sparse":
            if "indexer" in att:
                hand[("topk", att.layer)] = _select(att, sides[i:], ipool, quant[1], dtype, bucket,
                                                    n, ar(bucket), hand)
            idx, valid = hand[("topk", att.index_source)]
            parts.append((decode.pool_rows(pool, quant[0], F32, idx=idx), valid, True))
    return _attend(q.astype(F32) * c**-0.5, parts, att.attn_sink), out


def _select(att, qw: list, ipool: list, quant, dtype, bucket: int, n, rows: mx.array, hand: dict):
    """The top-k `(idx, valid)` `[B, 1, K]` of one token over the first `bucket` index keys,
    of which `n` are live; the candidate source also leaves its blocks in `hand`, which an index
    source after it scores alone (`v41.among_candidates`: only those rows are read)."""
    ix = att.indexer
    q, w = qw
    if ix.uses_candidates and "candidates" in hand:
        return among_candidates(ix, q, w, lambda i: decode.pool_rows(ipool, quant, dtype, idx=i), n,
                                hand["candidates"], bucket)
    keys = decode.pool_rows(ipool, quant, dtype, bucket)
    scores = mx.where(rows < n, score(q, w, keys), -mx.inf)
    if ix.is_candidate_source:
        hand["candidates"] = candidate_top(scores, n.reshape(1), ix.blocks, ix.block_size)[:2]
    idx = top_k(scores, ix.topk, rows)
    return idx, mx.take_along_axis(scores, idx, axis=-1) > -mx.inf


def attention(att, x, st, p, spec, ar, hand):
    q, q_lat, kv = att.project(x, p)
    o, out = core(att, q, kv, side(att, x, q_lat, p), st, p, spec, ar, hand)
    return att.out(o, p, x.dtype), out


def block_step(block, X, pre, ids, st, p, spec, ar, hand, rows=None):
    if "engram" in block:
        X = block.engram(X, rows)
    attn_pre, post, comb = block.coeffs(X, "attn")
    y, st = attention(block.attn, block.attn_norm(mhc.collapse(X, pre)), st, p, spec, ar, hand)
    X = mhc.expand(y, X, post, comb)
    ffn_pre, post, comb = block.coeffs(X, "ffn")
    X = mhc.expand(block.ffn(block.ffn_norm(mhc.collapse(X, attn_pre)), ids), X, post, comb)
    return X, ffn_pre, st


class DecodeStep41(decode.DecodeStep):
    """Compiled one-token steps of a `Model41`, one per variant key (see the module doc).
    A pipeline stage steps its own run of layers by overriding `_layers`, `_start`, `_finish`."""

    def _layers(self) -> list[int]:
        return list(range(len(self.model.layers)))

    def _start(self, ids, X, pre):
        """The streams and `pre` entering the first layer: the embedded ids and stream 0."""
        return self._begin(ids, X), first_pre(ids.shape[0], 1, self.model.args.hc_mult)

    def _finish(self, X, pre) -> tuple:
        return head41(self.model, X, pre), X

    def _build(self, key: tuple, sizes: tuple[int, ...]):
        ar = self._ranges(key[:-1])
        layers, blocks = self._layers(), self.model.layers
        engram = [i for i in layers if "engram" in blocks[i]]

        def step(ids, p, X, pre, *flat):
            rows = dict(zip(engram, flat[: len(engram)]))
            flat = flat[len(engram):]
            X, pre = self._start(ids, X, pre)
            new, k, hand = [], 0, {}
            for i, size, spec in zip(layers, sizes, key[:-1]):
                X, pre, st = block_step(blocks[i], X, pre, ids, list(flat[k : k + size]), p, spec,
                                        ar, hand, rows.get(i))
                new += st
                k += size
            return (*self._finish(X, pre), *new)

        return mx.compile(step)

    def _ranges(self, specs):
        for n in {self.model.args.sliding_window} | {s[4] for s in specs if s[4]}:
            if n not in self._aranges:
                self._aranges[n] = mx.arange(n)
                mx.eval(self._aranges[n])
        return self._aranges.__getitem__

    def run(self, ids: mx.array, X: mx.array, pre: mx.array, cache: list[LayerCache]) -> tuple:
        """Replay the variant for `cache`'s position, advance the cache by one token and return
        what `_finish` returns."""
        layers = self._layers()
        rows = engram_rows(self.model, layers, ids, cache)  # host: the ids, then table reads
        p = cache[0].offset
        key = plan(self.model.args, layers, cache, p) + (fq.mode(),)
        layouts = [state_arrays(c) for c in cache]
        sizes = tuple(len(a) for a in layouts)
        if key not in self.steps:
            self.steps[key] = self._build(key, sizes)
        flat = [a for arrays in layouts for a in arrays]
        del layouts
        out = self.steps[key](ids, mx.array(p, mx.int32), X, pre, *rows.values(), *flat)
        del flat
        i = n = len(out) - sum(sizes)
        for c, size, spec in zip(cache, sizes, key[:-1]):
            set_state(c, list(out[i : i + size]), spec[2])
            i += size
        return out[:n]

    def __call__(self, ids: mx.array, cache: list[LayerCache]):
        """Logits `[B, 1, V]` (fp32) and the final streams for one token per sequence."""
        return self.run(ids, self.no_streams, self.no_streams, cache)


class BatchStep41(DecodeStep41):
    """One token for each of several sequences, each at its own position (module doc)."""

    def __init__(self, model):
        super().__init__(model)
        self.cores: dict[tuple, object] = {}
        wrap = mx.compile if model.compiled_decode else (lambda f: f)
        self._before = [wrap(self._attn_in(b)) for b in model.layers]
        self._after = [wrap(self._attn_out(b)) for b in model.layers]
        self._head = wrap(lambda X, pre: head41(model, X, pre))

    @staticmethod
    def _attn_in(block):
        def run(X, pre, P, *rows):
            if rows:
                X = block.engram(X, rows[0])
            attn_pre, post, comb = block.coeffs(X, "attn")
            x = block.attn_norm(mhc.collapse(X, pre))
            q, q_lat, kv = block.attn.project(x, P)
            return X, attn_pre, post, comb, q, kv, *side(block.attn, x, q_lat, P)

        return run

    @staticmethod
    def _attn_out(block):
        def run(o, P, X, post, comb, attn_pre, ids):
            X = mhc.expand(block.attn.out(o, P, X.dtype), X, post, comb)
            ffn_pre, post, comb = block.coeffs(X, "ffn")
            y = block.ffn(block.ffn_norm(mhc.collapse(X, attn_pre)), ids)
            return mhc.expand(y, X, post, comb), ffn_pre

        return run

    def _core(self, i: int, spec: tuple, sig: tuple):
        """Layer i's per-sequence core; `sig` says which handoff arrays go in: the source's
        pool and index pool array counts (0 for an owner), a top-k, the candidate blocks."""
        key = (i, spec, sig)
        if key not in self.cores:
            att = self.model.layers[i].attn
            ar = self._ranges([spec])
            npool, nipool, topk, cand = sig

            def run(q, kv, p, sides, st, hin):
                hand, hin = {}, list(hin)
                if npool:
                    hand[("pool", att.pool_source)] = (hin[:npool], hin[npool : npool + nipool])
                    hin = hin[npool + nipool :]
                if topk:
                    hand[("topk", att.index_source)] = (hin[0], hin[1])
                    hin = hin[2:]
                if cand:
                    hand["candidates"] = (hin[0], hin[1])
                o, new = core(att, q, kv, sides, st, p, spec, ar, hand)
                extra = list(hand.get(("topk", i), ()))
                if "candidates" in hand and not cand:
                    extra += list(hand["candidates"])
                return (o, *new, *extra)

            self.cores[key] = mx.compile(run) if self.model.compiled_decode else run
        return self.cores[key]

    def __call__(self, ids: mx.array, caches: list[list[LayerCache]]) -> mx.array:
        """Logits `[B, 1, V]` (fp32) for `ids [B, 1]`, row b fed to `caches[b]` (each at one
        offset); every cache advances by one."""
        model, args = self.model, self.model.args
        rows = [model.engram_rows(ids[b : b + 1], c) for b, c in enumerate(caches)]
        ps = [c[0].offset for c in caches]
        keys = [plan(args, range(len(model.layers)), c, p) for c, p in zip(caches, ps)]
        P, pos = mx.array(ps, mx.int32), [mx.array(p, mx.int32) for p in ps]
        X = self._begin(ids, self.no_streams)
        pre = first_pre(ids.shape[0], 1, args.hc_mult)
        hands = [{} for _ in caches]
        for i, layer in enumerate(model.layers):
            engram = [mx.concatenate([r[i] for r in rows])] if "engram" in layer else []
            X, attn_pre, post, comb, q, kv, *sides = self._before[i](X, pre, P, *engram)
            outs = []
            for b, (cache, key, hand) in enumerate(zip(caches, keys, hands)):
                c, spec, r = cache[i], key[i], slice(b, b + 1)
                st = state_arrays(c)
                hin, sig = self._hand_in(i, spec, hand)
                res = self._core(i, spec, sig)(q[r], kv[r], pos[b], [a[r] for a in sides], st, hin)
                del st
                n = len(state_arrays(c))
                set_state(c, list(res[1 : 1 + n]), spec[2])
                self._hand_out(i, spec, hand, c, list(res[1 + n :]))
                outs.append(res[0])
            o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
            X, pre = self._after[i](o, P, X, post, comb, attn_pre, ids)
        return self._head(X, pre)

    def _hand_in(self, i: int, spec: tuple, hand: dict):
        att, args = self.model.layers[i].attn, self.model.args
        m, owner, _, mode, _, quant = spec
        hin, npool, nipool, topk, cand = [], 0, 0, False, False
        if m and not owner:
            pool, ipool = hand[("pool", att.pool_source)]
            hin, npool, nipool = list(pool) + list(ipool), len(pool), len(ipool)
        if mode == "sparse" and "indexer" not in att:
            hin += list(hand[("topk", att.index_source)])
            topk = True
        if mode == "sparse" and args.uses_candidates(i) and "candidates" in hand:
            hin += list(hand["candidates"])
            cand = True
        return hin, (npool, nipool, topk, cand)

    def _hand_out(self, i: int, spec: tuple, hand: dict, c: LayerCache, extra: list):
        att = self.model.layers[i].attn
        if spec[1]:  # an owner: its pools, as updated
            hand[("pool", i)] = (list(c.kv_pool.arrays.values()), list(c.index_pool.arrays.values()))
        if spec[3] == "sparse" and "indexer" in att:
            hand[("topk", i)] = (extra[0], extra[1])
            if att.indexer.is_candidate_source:
                hand["candidates"] = (extra[2], extra[3])
