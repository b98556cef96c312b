"""The grouped (block-diagonal) linear: each group multiplies its own block, any leading shape."""

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
