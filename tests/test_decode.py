"""The compiled one-token step (decode.py) against the eager path it replaces.

Across 4- and 128-token window closes, the indexer switching from dense to top-k, a pool growth
step, hash-routed layers and a batch of two, the logits and every state array must agree.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import decode
from mlx_dsv4.model.cache import make_cache


@pytest.mark.parametrize("batch,prompt,max_tokens,kv_bits", [(1, 1, 40, None), (2, 121, None, None),
                                                             (1, 1, None, 8)])
def test_compiled_step_equals_the_eager_step(tiny_model, token_ids, batch, prompt, max_tokens,
                                             kv_bits):
    ids = np.concatenate([token_ids[:, :300], token_ids[:, 300:600]])[:batch]
    eager, ce = decode(tiny_model, ids, False, prompt, max_tokens, kv_bits)
    compiled, cc = decode(tiny_model, ids, True, prompt, max_tokens, kv_bits)
    keys = tiny_model._decode_step.steps
    assert {spec[1] for key in keys for spec in key if spec[0] == 128} == {True, False}
    modes = {spec[2] for key in keys for spec in key if spec[0] == 4}
    assert modes == ({None, "dense", "sparse"} if prompt == 1 else {"sparse"})
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=2e-5)
    for a, b in zip(ce, cc):
        assert (a.offset, a.kv_pool and a.kv_pool.n) == (b.offset, b.kv_pool and b.kv_pool.n)
        for x, y in zip(live_state(a), live_state(b)):
            np.testing.assert_allclose(y, x, rtol=0, atol=2e-5)


def live_state(c):
    """The state a later step can read: the ring, pooled entries, carries and the rows of the
    current partial window (rows of a closed window are stale in either path)."""
    out = [c.window.keys]
    for comp, pool in ((c.compressor, c.kv_pool), (c.indexer, c.index_pool)):
        if comp is None:
            continue
        r = c.offset % comp.ratio
        out += [comp.kv[:, :r], comp.gate[:, :r]]
        out += [a[:, : pool.n] for a in pool.arrays.values()]
        if comp.overlap:
            out += [comp.carry_kv, comp.carry_gate]
    return [np.array(a.astype(mx.float32)) for a in out]


def test_pool_growth_happens_inside_the_compiled_run(tiny_model, token_ids):
    ids = token_ids[:, :200]
    _, cache = decode(tiny_model, ids, True, 2, 40)
    csa = next(c for c in cache if c.index_pool is not None)
    assert csa.kv_pool.capacity > 10 and csa.kv_pool.n == 50  # grew past its 10 reserved rows


def test_uneven_offsets_fall_back_to_eager(tiny_model, token_ids):
    from mlx_dsv4.model import decode as dec

    cache = make_cache(tiny_model)
    tiny_model(mx.array(token_ids[:, :9]), cache)
    assert dec.supported(tiny_model, cache, mx.array([[3]]))
    cache[1].offset += 1
    assert not dec.supported(tiny_model, cache, mx.array([[3]]))
