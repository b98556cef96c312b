"""The DeepSeek-V4 network: mHC residual streams, MoE, decoder blocks, HyperHead, MTP block.

`Model(ids, cache)` maps token ids `[B, S]` to logits `[B, S, V]`; all state lives in the cache
list from `cache.make_cache`, the model holds none. Attribute paths are the official checkpoint
names (`layers.3.attn.wkv`, `layers.0.ffn.gate.tid2eid`, `hc_head_fn`, `mtp.0.e_proj`), except that
routed experts are stacked per layer (`ffn.experts.w1.weight` is `[E, I, D]`) for `gather_mm`.
Attention and its pools are in `attention.py`; loading is in `weights.py`.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import decode, mhc
from .attention import Attention
from .cache import LayerCache, make_cache
from ..config import KEEP_FLOAT32, ModelArgs, keep_float32  # noqa: F401 (re-exported)
from .head import embed_streams, head_logits, hyper_head, init_head  # noqa: F401 (re-exported)
from .layers import ExpertLinear, FusedPair, RMSNorm


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


@partial(mx.compile, shapeless=True)
def _swiglu(gate, up, scale, limit):
    gate = mx.minimum(gate.astype(mx.float32), limit)
    up = mx.clip(up.astype(mx.float32), -limit, limit)
    return gate * mx.sigmoid(gate) * up * scale


def swiglu(gate: mx.array, up: mx.array, limit: float, scale: mx.array | None = None,
           dtype: mx.Dtype | None = None) -> mx.array:
    """Clamped SwiGLU in fp32 (gate capped above, up clipped both ways), times the routing
    weights `scale` if given, cast to `dtype`: one fused kernel, no fp32 temporaries between."""
    one = mx.array(1.0, mx.float32)
    out = _swiglu(gate, up, one if scale is None else scale, mx.array(limit, mx.float32))
    return out if dtype is None else out.astype(dtype)


class Gate(nn.Module):
    """Router: sqrt-softplus scores in fp32; top-k with a selection-only bias, or hash routing."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.k, self.scaling = args.num_experts_per_tok, args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if args.is_hash_layer(layer):
            self.tid2eid = mx.zeros((args.vocab_size, self.k), mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array, ids: mx.array):
        scores = mx.sqrt(mx.logaddexp(_f32(x) @ _f32(self.weight).T, 0.0))
        if "tid2eid" in self:
            idx = self.tid2eid[ids]
        else:
            biased = scores + _f32(self.bias)
            idx = mx.argpartition(-biased, self.k - 1, axis=-1)[..., : self.k]
        w = mx.take_along_axis(scores, idx, axis=-1)
        return idx, w / w.sum(axis=-1, keepdims=True) * self.scaling


# Rows of one prefill piece of the routed experts (Experts._sorted).
PIECE_ROWS = 1024


def _as_is(x: mx.array) -> mx.array:
    return x


class Experts(nn.Module):
    """The routed experts of one layer, stacked `[E, out, in]` for gather_mm / gather_qmm.

    `round_inputs` rounds the inputs of both matmuls (V4.1's fake-quant; V4: none)."""

    round_inputs = staticmethod(_as_is)

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, I, E = args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        self.limit = args.swiglu_limit
        self.w1 = ExpertLinear(D, I, E)
        self.w2 = ExpertLinear(I, D, E)
        self.w3 = ExpertLinear(D, I, E)
        self.w13: FusedPair | None = None  # set by fuse()
        self.stream = None  # set by stream_from()

    def fuse(self):
        if self.stream is None:
            self.w13 = FusedPair(self.w1, self.w3, axis=1)

    def stream_from(self, layer) -> None:
        """Read the experts on demand through `layer` (experts_stream.StreamedLayer) instead of
        holding them: w1, w2, w3 leave the module, so they are neither loaded nor listed."""
        self.stream = layer
        for name in ("w1", "w2", "w3"):
            self.pop(name)

    def _gate_up(self, xs, idx, sorted_indices=False):
        if self.w13 is not None:
            return self.w13(xs, idx, sorted_indices)
        return self.w1(xs, idx, sorted_indices), self.w3(xs, idx, sorted_indices)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """Sum over the k picks of weight * expert(x), in fp32: `[B, S, D]`."""
        B, S, k = idx.shape
        dtype = x.dtype
        gate_up, down = self._gate_up, self.get("w2")
        if self.stream is not None:  # the picked experts only, idx renumbered into them
            idx, gate_up, down = self.stream.fetch(idx, x)
        x = self.round_inputs(x)
        if idx.size >= 64:
            return self._sorted(x, idx, weights, gate_up, down).reshape(B, S, -1)
        xs = x[..., None, None, :]
        h = self.round_inputs(swiglu(*gate_up(xs, idx), self.limit, weights[..., None, None], dtype))
        return _f32(down(h, idx)[..., 0, :]).sum(axis=-2)

    def _sorted(self, x, idx, weights, gate_up, down) -> mx.array:
        """Prefill: rows sorted by expert, so gather_qmm reads each expert's weights once.

        The sorted rows run in pieces of at most PIECE_ROWS (consecutive in expert order, so the
        weight reads do not grow) and each piece is added into the token-ordered fp32 result
        before the next starts: the [rows, D] copies of the whole chunk (sorted input, gate/up,
        output, its unsorted twin) are never alive together. Picking rows by lhs_indices instead
        of copying them saves less and ran 13% slower on the CPU backend (mxfp4, alternating).
        """
        k, D = idx.shape[-1], x.shape[-1]
        flat = idx.reshape(-1)
        order = mx.argsort(flat)
        ids, scale = flat[order], weights.reshape(-1)[order][:, None, None]
        rows = x.reshape(-1, 1, D)
        # Where each token's j-th pick landed in the sorted order: [tokens, k].
        where = mx.argsort(order).reshape(-1, k)
        out = mx.zeros((flat.size // k, D), mx.float32)
        for r0 in range(0, flat.size, PIECE_ROWS):
            r1 = min(flat.size, r0 + PIECE_ROWS)
            part = slice(r0, r1)
            src = rows if r0 == 0 else mx.depends(rows, out)  # piece after piece, as queued
            h = self.round_inputs(swiglu(*gate_up(src[order[part] // k], ids[part], sorted_indices=True),
                                         self.limit, scale[part], x.dtype))
            y = down(h, ids[part], sorted_indices=True)[:, 0]
            for j in range(k):
                pos = where[:, j] - r0
                out = _add_picked(out, y[mx.clip(pos, 0, r1 - r0 - 1)], pos, r1 - r0)
        return out


@partial(mx.compile, shapeless=True)
def _add_picked_fn(out, rows, pos, n):
    return out + mx.where(((pos >= 0) & (pos < n))[:, None], rows.astype(mx.float32), 0.0)


def _add_picked(out: mx.array, rows: mx.array, pos: mx.array, n: int) -> mx.array:
    """`out + rows` (fp32) where `0 <= pos < n`: one piece's share of each token's sum."""
    return _add_picked_fn(out, rows, pos, mx.array(n, mx.int32))


class SharedExpert(nn.Module):
    round_inputs = staticmethod(_as_is)  # as Experts.round_inputs

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, I = args.hidden_size, args.moe_intermediate_size
        self.limit = args.swiglu_limit
        self.w1 = nn.Linear(D, I, bias=False)
        self.w2 = nn.Linear(I, D, bias=False)
        self.w3 = nn.Linear(D, I, bias=False)
        self.w13: FusedPair | None = None  # set by fuse()

    def fuse(self):
        self.w13 = FusedPair(self.w1, self.w3, axis=0)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.round_inputs(x)
        gate, up = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(self.round_inputs(swiglu(gate, up, self.limit, dtype=x.dtype)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.gate = Gate(args, layer)
        self.experts = Experts(args)
        self.shared_experts = SharedExpert(args)

    def __call__(self, x: mx.array, ids: mx.array) -> mx.array:
        idx, w = self.gate(x, ids)
        y = self.experts(x, idx, w) + _f32(self.shared_experts(x))
        return y.astype(x.dtype)


def init_sites(module: nn.Module, args: ModelArgs):
    """A block's two mHC sites (`hc_{attn,ffn}_{fn,base,scale}`) and their RMSNorms, as V4 and
    V4.1 name them."""
    N, D = args.hc_mult, args.hidden_size
    for site in ("attn", "ffn"):
        setattr(module, f"hc_{site}_fn", mx.zeros(((N + 2) * N, N * D)))
        setattr(module, f"hc_{site}_base", mx.zeros(((N + 2) * N,)))
        setattr(module, f"hc_{site}_scale", mx.ones((3,)))
    module.attn_norm = RMSNorm(D, args.rms_norm_eps)
    module.ffn_norm = RMSNorm(D, args.rms_norm_eps)


class Block(nn.Module):
    """One decoder block: mHC around attention, mHC around the MoE (spec §2.3)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        init_sites(self, args)
        self.attn = Attention(args, layer)
        self.ffn = MoE(args, layer)
        self._hc = (args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)

    def _mix(self, X: mx.array, site: str):
        fn, base, scale = (getattr(self, f"hc_{site}_{p}") for p in ("fn", "base", "scale"))
        return mhc.mix(X, fn, base, scale, *self._hc)

    def __call__(self, X: mx.array, ids: mx.array, cache: LayerCache) -> mx.array:
        x, post, comb = self._mix(X, "attn")
        X = mhc.expand(self.attn(self.attn_norm(x), cache), X, post, comb)
        x, post, comb = self._mix(X, "ffn")
        return mhc.expand(self.ffn(self.ffn_norm(x), ids), X, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block (spec §2.11): proposes token t+2 from the trunk's streams."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        D = args.hidden_size
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.norm = RMSNorm(D, args.rms_norm_eps)
        init_head(self, args)

    def predict(self, streams: mx.array, next_ids: mx.array, embed, head, cache: LayerCache):
        e = self.enorm(embed(next_ids))
        X = self.e_proj(e)[:, :, None, :] + self.h_proj(self.hnorm(streams))
        X = Block.__call__(self, X, next_ids, cache)
        return head(self.norm(hyper_head(self, X))), X


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        init_head(self, args)
        L = args.num_hidden_layers
        self.mtp = [MTPBlock(args, L + k) for k in range(args.num_nextn_predict_layers)]
        # One-token steps replay a compiled graph (decode.py); False runs them eagerly.
        self.compiled_decode = True
        self._decode_step = None

    def fuse(self):
        """Gate and up projections of every MoE as one matrix (after loading; keeps memory)."""
        for block in self.layers + self.mtp:
            block.ffn.experts.fuse()
            block.ffn.shared_experts.fuse()
            mx.clear_cache()  # one layer's unfused copy at a time, returned as it goes
        self._decode_step = None  # compiled steps captured the unfused weights

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype: that of the embedding table (its scales when quantized)."""
        return self.embed["scales"].dtype if "scales" in self.embed else self.embed.weight.dtype

    def __call__(self, ids: mx.array, cache: list[LayerCache] | None = None,
                 last_only: bool = False, return_streams: bool = False):
        """Logits `[B, S, V]` (fp32) for token ids `[B, S]`; advances the cache by S.

        `last_only` computes the head for the last position only (what generation needs).
        `return_streams` also returns the final residual streams `[B, S, N, D]` for MTP.
        """
        if cache is None:
            cache = make_cache(self, batch=ids.shape[0])
        if self.compiled_decode and decode.supported(self, cache, ids):
            if self._decode_step is None:
                self._decode_step = decode.DecodeStep(self)
            logits, streams = self._decode_step(ids, cache)
            return (logits, streams) if return_streams else logits
        X = embed_streams(self, ids)
        for layer, c in zip(self.layers, cache):
            X = layer(X, ids, c)
        logits = head_logits(self, X[:, -1:] if last_only else X)
        return (logits, X) if return_streams else logits

    def batch_step(self):
        """A step that decodes one token for each of several sequences at their own positions."""
        from .batch_decode import BatchStep

        return BatchStep(self)

    def mtp_logits(self, streams: mx.array, next_ids: mx.array, cache: list[LayerCache],
                   return_streams: bool = False):
        """Logits of the MTP block(s) given the trunk's final streams and the next token ids;
        with `return_streams`, also the block's own output streams (a stand-in for the trunk's
        when drafting further ahead)."""
        logits, X = self.mtp[0].predict(streams, next_ids, self.embed, self.head, cache[0])
        return (_f32(logits), X) if return_streams else _f32(logits)
