"""Layers: the grouped (block-diagonal) linear multiplies each group by its own block, any
leading shape; the routed experts give the same sums on the prefill and one-token paths."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_dsv4.model.layers import GroupedLinear


@pytest.mark.parametrize("lead", [(1, 1), (2, 5)])  # a decode step and a prefill chunk
def test_grouped_linear_is_block_diagonal(lead):
    g, d_in, d_out = 3, 64, 8
    lin = GroupedLinear(d_in, d_out, g)
    lin.weight = mx.random.normal((g * d_out, d_in), key=mx.random.key(0))
    x = mx.random.normal((*lead, g, d_in), key=mx.random.key(1))
    w = np.array(lin.weight).reshape(g, d_out, d_in)
    want = np.einsum("...gi,goi->...go", np.array(x), w)
    np.testing.assert_allclose(np.array(lin(x)), want, rtol=1e-4, atol=1e-4)
    q = lin.to_quantized(group_size=32, bits=8)
    wq = np.array(mx.dequantize(q.weight, q.scales, q.biases, 32, 8)).reshape(g, d_out, d_in)
    got = q(x)
    assert got.shape == (*lead, g, d_out)
    np.testing.assert_allclose(np.array(got), np.einsum("...gi,goi->...go", np.array(x), wq),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("piece_rows", [17, 64, 4096])  # several uneven pieces, exact, one
def test_prefill_experts_in_pieces_equal_each_token_alone(tiny_args, monkeypatch, quantized,
                                                          piece_rows):
    """The sorted prefill path (rows grouped by expert, run piece by piece, summed back in token
    order) gives what each token gives through the one-token path."""
    from mlx_dsv4.model import model as model_mod

    experts = model_mod.Experts(tiny_args)
    E, k = tiny_args.n_routed_experts, tiny_args.num_experts_per_tok
    for i, lin in enumerate((experts.w1, experts.w2, experts.w3)):
        lin.weight = 0.2 * mx.random.normal(lin.weight.shape, key=mx.random.key(10 + i))
    if quantized:
        for name in ("w1", "w2", "w3"):
            setattr(experts, name, getattr(experts, name).to_quantized(group_size=32, bits=8))
    experts.fuse()
    S = 40
    x = mx.random.normal((1, S, tiny_args.hidden_size), key=mx.random.key(1))
    idx = mx.random.randint(0, E, (1, S, k), key=mx.random.key(2)).astype(mx.int32)
    w = mx.random.uniform(shape=(1, S, k), key=mx.random.key(3))
    assert idx.size >= 64  # the sorted path
    monkeypatch.setattr(model_mod, "PIECE_ROWS", piece_rows)
    got = experts(x, idx, w)
    alone = mx.concatenate([experts(x[:, t : t + 1], idx[:, t : t + 1], w[:, t : t + 1])
                            for t in range(S)], axis=1)
    assert got.dtype == mx.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.array(got), np.array(alone), rtol=1e-5, atol=1e-5)
