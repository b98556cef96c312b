"""What surrounds the blocks: token ids into the N residual streams, and the final streams into
fp32 logits (V4's HyperHead collapse, or V4.1's collapse by the last lagged `pre`).

Below `model.py`, `v41.py`, the compiled steps and pipeline stages, which all begin and end a
forward with these, so none of them imports another for it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import mhc
from ..config import ModelArgs


def init_head(module: nn.Module, args: ModelArgs):
    """Give `module` the HyperHead parameters `hc_head_{fn,base,scale}` (final collapse)."""
    N, D = args.hc_mult, args.hidden_size
    module.hc_head_fn = mx.zeros((N, N * D))
    module.hc_head_base = mx.zeros((N,))
    module.hc_head_scale = mx.ones((1,))
    module._head_eps = (args.hc_eps, args.rms_norm_eps)


def hyper_head(module: nn.Module, X: mx.array) -> mx.array:
    """V4's final collapse of the N streams into one (`init_head`'s parameters)."""
    return mhc.head(X, module.hc_head_fn, module.hc_head_base, module.hc_head_scale,
                    *module._head_eps)


def embed_streams(module: nn.Module, ids: mx.array) -> mx.array:
    """The streams `[B, S, N, D]` entering the first block: `module.embed(ids)`, N times."""
    h = module.embed(ids)
    return mx.broadcast_to(h[:, :, None, :], (*h.shape[:2], module.args.hc_mult, h.shape[-1]))


def head_logits(module: nn.Module, X: mx.array) -> mx.array:
    """fp32 logits of the final streams: HyperHead collapse, final norm, vocabulary projection."""
    return module.head(module.norm(hyper_head(module, X))).astype(mx.float32)


def first_pre(B: int, S: int, n: int) -> mx.array:
    """The lagged mHC's first collapse: stream 0 alone."""
    return mx.broadcast_to((mx.arange(n) == 0).astype(mx.float32), (B, S, n))


def head41(model, X: mx.array, pre: mx.array) -> mx.array:
    """fp32 logits of the final streams: the last `pre` collapses them, then norm and head."""
    return model.head(model.norm(mhc.collapse(X, pre))).astype(mx.float32)
