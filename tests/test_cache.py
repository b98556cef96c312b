"""Decode-state identity without the oracle: every way of feeding a sequence gives the same logits."""

import numpy as np
import pytest

import mlx.core as mx

from mlx_dsv4.model.cache import GROW_ENTRIES, EntryPool, make_cache

N = 300  # crosses 4-token windows, two 128-token HCA windows and the 128-slot ring wrap


def feed(model, ids, chunks, cache=None):
    cache = cache if cache is not None else make_cache(model, batch=ids.shape[0])
    outs, start = [], 0
    for n in chunks:
        outs.append(np.array(model(mx.array(ids[:, start : start + n]), cache)))
        start += n
    return np.concatenate(outs, axis=1), cache


@pytest.fixture(scope="module")
def oneshot(tiny_model, token_ids):
    return feed(tiny_model, token_ids[:, :N], [N])[0]


@pytest.mark.parametrize("chunks", [
    [4, 124, 1, 127, 44],          # chunk borders on and around window borders
    [3, 1, 128, 2, 129, 37],       # a chunk longer than the ring
    [255, 1, 1, 1, 42],            # decode steps that close 4- and 128-token windows
])
def test_chunkings_equal_oneshot(tiny_model, token_ids, oneshot, chunks):
    out, cache = feed(tiny_model, token_ids[:, :N], chunks)
    np.testing.assert_allclose(out, oneshot, atol=1e-4, rtol=0)
    assert all(c.offset == N for c in cache)


def test_token_by_token_equals_oneshot(tiny_model, token_ids, oneshot):
    out, _ = feed(tiny_model, token_ids[:, :N], [1] * N)
    np.testing.assert_allclose(out, oneshot, atol=1e-4, rtol=0)


def test_batch_rows_are_independent(tiny_model, token_ids, oneshot):
    ids = np.concatenate([token_ids[:, :N], token_ids[:, N : 2 * N]], axis=0)
    out, _ = feed(tiny_model, ids, [130, 170])
    np.testing.assert_allclose(out[:1], oneshot, atol=1e-4, rtol=0)
    single, _ = feed(tiny_model, ids[1:], [N])
    np.testing.assert_allclose(out[1:], single, atol=1e-4, rtol=0)


def test_snapshot_restore_is_exact(tiny_model, token_ids):
    ids = token_ids[:, :200]
    _, cache = feed(tiny_model, ids, [150])
    snaps = [c.snapshot() for c in cache]
    first, _ = feed(tiny_model, ids[:, 150:], [1] * 50, cache)
    other = np.array(token_ids[:, 300:350])
    feed(tiny_model, other, [50], cache)  # move the state somewhere else entirely
    for c, s in zip(cache, snaps):
        c.restore(s)
    again, _ = feed(tiny_model, ids[:, 150:], [1] * 50, cache)
    np.testing.assert_array_equal(first, again)


def test_preallocated_pools_match_growing_pools(tiny_model, token_ids, oneshot):
    cache = make_cache(tiny_model, max_tokens=N)
    caps = [c.kv_pool.capacity for c in cache if c.kv_pool is not None]
    out, cache = feed(tiny_model, token_ids[:, :N], [100, 200], cache)
    np.testing.assert_allclose(out, oneshot, atol=1e-4, rtol=0)
    assert [c.kv_pool.capacity for c in cache if c.kv_pool is not None] == caps


def test_pool_grows_in_steps_not_per_entry():
    pool = EntryPool(batch=1, width=8, dtype=mx.float32)
    capacities = set()
    for i in range(1000):
        pool.append(mx.full((1, 1, 8), float(i)))
        capacities.add(pool.capacity)
    assert pool.n == 1000
    assert len(capacities) <= 4 and min(capacities) >= GROW_ENTRIES
    np.testing.assert_array_equal(np.array(pool.keys(mx.float32))[0, :, 0], np.arange(1000))


def test_nbytes_counts_every_array(tiny_args):
    cache = make_cache(tiny_args, dtype=mx.bfloat16, max_tokens=1024)
    c = tiny_args.head_dim
    for lc, i in zip(cache, range(tiny_args.num_hidden_layers)):
        ring = 128 * c * 2
        m = tiny_args.compress_ratio(i)
        expect = ring
        if m:
            k = 2 if m == 4 else 1
            expect += 2 * m * k * c * 4 + (1024 // m) * c * 2
        if m == 4:
            ci = tiny_args.index_head_dim
            expect += 2 * m * c * 4 + 2 * m * 2 * ci * 4 + 2 * m * ci * 4 + (1024 // m) * ci * 2
        assert lc.nbytes == expect, i


def test_mtp_block_runs_and_keeps_its_own_window_state(tiny_model, token_ids):
    """The MTP block (loaded with the trunk) proposes from the final streams and next ids."""
    ids = mx.array(token_ids[:, :200])
    logits, streams = tiny_model(ids, make_cache(tiny_model), return_streams=True)
    assert streams.shape == (1, 200, tiny_model.args.hc_mult, tiny_model.args.hidden_size)
    nxt = mx.array(token_ids[:, 1:201])
    whole = np.array(tiny_model.mtp_logits(streams, nxt, make_cache(tiny_model, mtp=True)))
    assert whole.shape == (1, 200, tiny_model.args.vocab_size) and np.isfinite(whole).all()
    cache = make_cache(tiny_model, mtp=True)
    parts = [np.array(tiny_model.mtp_logits(streams[:, a:b], nxt[:, a:b], cache))
             for a, b in ((0, 70), (70, 71), (71, 200))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-4, rtol=0)
    assert not np.allclose(whole[0, -1], np.array(logits)[0, -1])  # its own head path, not a copy
