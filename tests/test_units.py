"""Numerical invariants of the building blocks: Sinkhorn, YaRN, RoPE placement."""

import math

import numpy as np

import mlx.core as mx

from mlx_dsv4.model.attention import rope, rope_periods
from mlx_dsv4.config import ModelArgs, yarn_inv_freq
from mlx_dsv4.model import mhc


def _numpy_sinkhorn(M, iters=20, eps=1e-6):
    """The reference order: row softmax, +eps, column first, then (row, column) x (iters-1)."""
    C = np.exp(M - M.max(-1, keepdims=True))
    C = C / C.sum(-1, keepdims=True) + eps
    C = C / (C.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(-1, keepdims=True) + eps)
        C = C / (C.sum(-2, keepdims=True) + eps)
    return C


def test_sinkhorn_is_doubly_stochastic_and_in_reference_order():
    n, D = 4, 32
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 5, n, D)).astype(np.float32)
    fn = (rng.standard_normal(((n + 2) * n, n * D)) / np.sqrt(n * D)).astype(np.float32)
    base = (0.5 * rng.standard_normal((n + 2) * n)).astype(np.float32)
    # 20 iterations end on a column step: columns are exact, rows converge for mild logits.
    scale = np.array([1.0, 1.0, 1.0], np.float32)
    x, post, comb = mhc.mix(mx.array(X), mx.array(fn), mx.array(base), mx.array(scale), 20, 1e-6, 1e-6)
    comb, post = np.array(comb), np.array(post)
    assert np.abs(comb.sum(axis=-2) - 1).max() < 1e-5
    assert np.abs(comb.sum(axis=-1) - 1).max() < 1e-5
    v = X.reshape(2, 5, n * D)
    v = v / np.sqrt((v**2).mean(-1, keepdims=True) + 1e-6)
    M = (v @ fn[2 * n :].T + base[2 * n :]).reshape(2, 5, n, n)
    np.testing.assert_allclose(comb, _numpy_sinkhorn(M.astype(np.float64)), atol=1e-6)
    pre = 1 / (1 + np.exp(-(v @ fn[:n].T + base[:n]))) + 1e-6
    np.testing.assert_allclose(np.array(x), (pre[..., None] * X).sum(2), atol=1e-4)
    assert post.min() >= 0 and post.max() <= 2


def test_yarn_table_matches_spec():
    inv = yarn_inv_freq(64, 160000, {"type": "yarn", "factor": 16,
                                     "original_max_position_embeddings": 65536,
                                     "beta_fast": 32, "beta_slow": 1})
    plain = [160000 ** (-2 * i / 64) for i in range(32)]
    assert inv[:16] == plain[:16]                      # pairs 0..15 unchanged
    np.testing.assert_allclose(inv[25:], np.array(plain[25:]) / 16, rtol=1e-12)  # 25..31 / 16
    assert math.isclose(inv[16], 2.2656e-3, rel_tol=1e-4)
    assert math.isclose(inv[20], 2.970e-4, rel_tol=1e-3)


def test_sliding_layers_use_plain_base_10000(tiny_args: ModelArgs):
    assert tiny_args.rope_inv_freq(0) == [10000 ** (-2 * i / 16) for i in range(8)]
    assert tiny_args.rope_inv_freq(1) != tiny_args.rope_inv_freq(0)


def _numpy_rope(x, inv_freq, pos):
    """Interleaved pairs on the last 2*len(inv_freq) dims, rotated by pos * theta."""
    out = x.copy()
    lead = x.shape[-1] - 2 * len(inv_freq)
    for i, th in enumerate(inv_freq):
        a, b = x[..., lead + 2 * i], x[..., lead + 2 * i + 1]
        c, s = np.cos(pos * th), np.sin(pos * th)
        out[..., lead + 2 * i], out[..., lead + 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


def test_rope_rotates_only_the_last_dims_interleaved(tiny_args):
    inv = tiny_args.rope_inv_freq(1)
    x = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32)
    y = np.array(rope(mx.array(x), rope_periods(inv, 64), offset=1000))
    ref = np.stack([_numpy_rope(x[0, t], np.array(inv), 1000 + t) for t in range(3)])
    np.testing.assert_allclose(y[0], ref, atol=2e-5)
    back = np.array(rope(mx.array(y), rope_periods(inv, 64), offset=1000, inverse=True))
    np.testing.assert_allclose(back, x, atol=2e-5)


def test_entry_rope_equals_token_rope_at_window_start(tiny_args):
    periods = rope_periods(tiny_args.rope_inv_freq(2), 64)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32))
    for m in (4, 128):
        as_entries = rope(x, periods, offset=7, scale=m)      # entries 7..11
        for j in range(5):
            as_token = rope(x[:, j : j + 1], periods, offset=(7 + j) * m)
            np.testing.assert_allclose(np.array(as_entries[:, j]), np.array(as_token[:, 0]), atol=1e-5)
