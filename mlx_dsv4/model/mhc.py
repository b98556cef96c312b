"""Manifold-constrained hyper-connections (mHC, spec §2.2): the N residual streams of V4.

Each block site turns the streams `X [B, S, N, D]` into one sublayer input (collapse with `pre`)
and folds the sublayer output back (`post`, and the doubly-stochastic mixing `comb` from
Sinkhorn). All of it is fp32, as in the reference. The functions are compiled shapeless, so
every chunk length shares one graph (and compiled code cannot slice: fn and base arrive split).

Cost note: the 20 Sinkhorn iterations are ~80 tiny kernels per site in any pure-MLX form
(MLX fuses elementwise chains but not reductions, and caps a fused kernel's depth), so on a GPU
they run as one custom kernel (`kernels.sinkhorn`). Writing the 4x4 maths per scalar does not
help: MLX's fusion limits (depth 11, 24 arrays) split it into even more kernels.
"""

from __future__ import annotations

from functools import lru_cache, partial

import mlx.core as mx

from . import kernels

F32 = mx.float32


@lru_cache(maxsize=None)
def _mix_fn(n: int, width: int, hc_eps: float, norm_eps: float):
    # The width is part of the cache key: a shapeless graph bakes the Python number in.
    inv_width = 1.0 / width

    def mix(X, fn_pre, fn_post, fn_comb, base_pre, base_post, base_comb, scale):
        Xf = X.astype(F32)
        v = mx.flatten(Xf, -2, -1)
        # 1/RMS of each token's N*D values from a dot product, applied after the (linear)
        # projections: no [tokens, N*D] temporary of v*v or of the normalised v is ever made.
        r = mx.rsqrt((v[..., None, :] @ v[..., None])[..., 0] * inv_width + norm_eps)
        pre = mx.sigmoid((v @ fn_pre.T) * r * scale[0] + base_pre) + hc_eps
        post = 2 * mx.sigmoid((v @ fn_post.T) * r * scale[1] + base_post)
        logits = mx.unflatten((v @ fn_comb.T) * r * scale[2] + base_comb, -1, (n, n))
        x = (pre[..., None, :] @ Xf)[..., 0, :]  # the weighted sum of streams as a product
        return x.astype(X.dtype), post, logits

    return mx.compile(mix, shapeless=True)


@lru_cache(maxsize=None)
def _coeffs_fn(n: int, width: int, hc_eps: float, norm_eps: float):
    inv_width = 1.0 / width

    def coeffs(X, fn_pre, fn_post, fn_comb, base_pre, base_post, base_comb, scale):
        v = mx.flatten(X.astype(F32), -2, -1)
        r = mx.rsqrt((v[..., None, :] @ v[..., None])[..., 0] * inv_width + norm_eps)
        pre = mx.sigmoid((v @ fn_pre.T) * r * scale[0] + base_pre) + hc_eps
        post = 2 * mx.sigmoid((v @ fn_post.T) * r * scale[1] + base_post)
        logits = mx.unflatten((v @ fn_comb.T) * r * scale[2] + base_comb, -1, (n, n))
        return pre, post, logits

    return mx.compile(coeffs, shapeless=True)


@partial(mx.compile, shapeless=True)
def _collapse(X, pre):
    return (pre[..., None, :] @ X.astype(F32))[..., 0, :].astype(X.dtype)


@partial(mx.compile, shapeless=True)
def _expand(y, X, post, comb):
    # X'_b = post_b * y + sum_a comb[a, b] * X_a: the sum runs over comb's FIRST index.
    out = post[..., None] * y.astype(F32)[..., None, :]
    out = out + comb.swapaxes(-1, -2) @ X.astype(F32)
    return out.astype(X.dtype)


@lru_cache(maxsize=None)
def _head_fn(hc_eps: float, norm_eps: float):
    def head(X, fn, base, scale):
        v = mx.flatten(X, -2, -1).astype(F32)
        v = v * mx.rsqrt(mx.mean(v * v, axis=-1, keepdims=True) + norm_eps)
        w = mx.sigmoid((v @ fn.T) * scale + base) + hc_eps
        return (w[..., None] * X.astype(F32)).sum(axis=-2).astype(X.dtype)

    return mx.compile(head, shapeless=True)


def mix(X: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int, hc_eps: float,
        norm_eps: float):
    """One site: (sublayer input `[B, S, D]`, post `[B, S, N]`, comb `[B, S, N, N]`)."""
    n = X.shape[-2]
    cuts = [n, 2 * n]
    x, post, logits = _mix_fn(n, n * X.shape[-1], hc_eps, norm_eps)(
        X, *mx.split(fn.astype(F32), cuts), *mx.split(base.astype(F32), cuts), scale.astype(F32))
    return x, post, kernels.sinkhorn(logits, iters, hc_eps)


def coeffs(X: mx.array, fn: mx.array, base: mx.array, scale: mx.array, iters: int, hc_eps: float,
           norm_eps: float):
    """One site's (pre `[B, S, N]`, post, comb) without the collapse: V4.1 lags its mHC, so a
    sublayer collapses with the `pre` its predecessor computed (`collapse`)."""
    n = X.shape[-2]
    cuts = [n, 2 * n]
    pre, post, logits = _coeffs_fn(n, n * X.shape[-1], hc_eps, norm_eps)(
        X, *mx.split(fn.astype(F32), cuts), *mx.split(base.astype(F32), cuts), scale.astype(F32))
    return pre, post, kernels.sinkhorn(logits, iters, hc_eps)


def collapse(X: mx.array, pre: mx.array) -> mx.array:
    """The streams `[B, S, N, D]` weighted by `pre [B, S, N]` and summed, in fp32."""
    return _collapse(X, pre)


def expand(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """Fold the sublayer output `y [B, S, D]` back into the streams."""
    return _expand(y, X, post, comb)


def head(X: mx.array, fn: mx.array, base: mx.array, scale: mx.array, hc_eps: float,
         norm_eps: float) -> mx.array:
    """HyperHead: the final collapse, `w_i = sigmoid(mu_i * scale + base_i) + eps`, no Sinkhorn."""
    return _head_fn(hc_eps, norm_eps)(X, fn.astype(F32), base.astype(F32), scale.astype(F32))
