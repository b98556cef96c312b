"""V4.1's compiled one-token step and batched step against the eager path; FP4 pools.

With the tiny V4.1 (v41_helpers) from a one-token prompt, the ratio-2 owner closes a window
every other token, the pools go from empty to dense to sparse (top-k 8), the candidate blocks
start restricting, rings wrap (window 32) and a preallocated pool grows inside the run.
"""

import mlx.core as mx
import numpy as np
import pytest

import v41_helpers as H
from mlx_dsv4.config import ModelArgs
from conftest import decode
from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.model.v41_decode import BatchStep41

T = 80


@pytest.fixture(scope="module")
def model():
    return H.tiny_model()


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(3, 256, (2, 120))


@pytest.mark.parametrize("batch,prompt,max_tokens,kv_bits", [(1, 1, None, None), (2, 37, 40, None),
                                                             (1, 1, None, 4)])
def test_compiled_step_equals_the_eager_step(model, ids, monkeypatch, batch, prompt, max_tokens, kv_bits):
    # Without roundings, so the states compare value for value (a rounding turns a last-bit
    # difference between two paths into a whole FP8 step; the logits agree either way).
    monkeypatch.setenv("MLX_DSV4_FAKE_QUANT", "0" if kv_bits is None else "kv")
    x = ids[:batch, :T]
    eager, ce = decode(model, x, False, prompt, max_tokens, kv_bits)
    compiled, cc = decode(model, x, True, prompt, max_tokens, kv_bits)
    keys = model._decode_step.steps
    modes = {spec[3] for key in keys for spec in key[:-1] if spec[0]}
    assert modes == ({None, "dense", "sparse"} if prompt == 1 else {"sparse"})
    assert {spec[2] for key in keys for spec in key[:-1] if spec[0] == 2} == {True, False}
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=2e-5)
    for a, b in zip(ce, cc):
        assert (a.offset, a.kv_pool and a.kv_pool.n) == (b.offset, b.kv_pool and b.kv_pool.n)
        if kv_bits is not None:
            continue
        np.testing.assert_allclose(np.array(b.window.keys), np.array(a.window.keys), atol=2e-5)
        if a.kv_pool is not None:
            for pool in ("kv_pool", "index_pool"):
                for k, v in getattr(a, pool).arrays.items():
                    w = getattr(b, pool).arrays[k]
                    np.testing.assert_allclose(np.array(w[:, : a.kv_pool.n].astype(mx.float32)),
                                               np.array(v[:, : a.kv_pool.n].astype(mx.float32)), atol=2e-5)


def test_the_batched_step_equals_each_sequence_alone(model, ids):
    """Two sequences at different positions, as the server batches them."""
    step = model.batch_step()
    assert isinstance(step, BatchStep41)
    caches, alone = [make_cache(model), make_cache(model)], [make_cache(model), make_cache(model)]
    for cs in (caches, alone):
        model(mx.array(ids[:1, :30]), cs[0])
        model(mx.array(ids[1:, :61]), cs[1])
    for k in range(40):
        tok = mx.array(np.array([[ids[0, 30 + k]], [ids[1, 61 + k]]]))
        got = np.array(step(tok, caches))
        want = np.concatenate([np.array(model(tok[:1], alone[0])), np.array(model(tok[1:], alone[1]))])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert [c[0].offset for c in caches] == [70, 101]


def test_fp4_pools_lose_nothing_under_the_default_fake_quant(model, ids, monkeypatch):
    """The default roundings make entries FP4 with e4m3 scales per 16 and index keys FP4 with
    power-of-two scales per 32: storing them as nvfp4 / mxfp4 changes no logit."""
    monkeypatch.delenv("MLX_DSV4_FAKE_QUANT", raising=False)
    x = ids[:1, :T]
    plain, cp = decode(model, x, False, T)
    fp4, c4 = decode(model, x, False, T, kv_bits=4)
    np.testing.assert_array_equal(fp4, plain)
    assert c4[4].kv_pool.mode == "nvfp4" and c4[4].index_pool.mode == "mxfp4"
    with pytest.raises(ValueError, match="official FP4 formats"):
        make_cache(ModelArgs.from_dict(__import__("mlx_dsv4.synthetic", fromlist=["x"]).tiny_config()),
                   kv_bits=4)
