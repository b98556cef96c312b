"""The V4.1 network against mlx-vlm 0.7.10's one-shot forward, and its decode state against itself.

The tiny V4.1 (synthetic.tiny_v41_config) has a sliding layer, two Engram layers, a ratio-2 pool
with a reader, a ratio-1 pool whose owner picks candidate blocks, an index source scoring only
those, and a layer reusing its top-k; with a 32-token window and top-k 8, a 150-token sequence
wraps every ring, closes ~75 ratio-2 windows and makes the indexer select from up to 150
entries. Parity with mlx-vlm is taken with fake-quant off on both sides (and, as a check of
`all`, with it on on both), in fp32 (MLX's CPU gather_mm has no bf16).
"""

import mlx.core as mx
import numpy as np
import pytest

import v41_helpers as H
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.model.cache import make_cache

T = 150
PARITY = 5e-3  # relative: max |ours - reference| over max |reference|, per position
SELF = 1e-4


@pytest.fixture(scope="module")
def setup():
    cfg = H.config()
    args = ModelArgs.from_dict(cfg)
    official = H.weights(args)
    return cfg, args, official, H.build(args, official)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(3, 256, (1, T))


def rel(got, want):
    return (np.abs(got - want).max(-1) / np.abs(want).max(-1)).max()


def run(model, ids, chunks):
    cache, outs, start = make_cache(model, batch=ids.shape[0]), [], 0
    for n in chunks:
        outs.append(np.array(model(mx.array(ids[:, start : start + n]), cache)))
        start += n
    assert start == ids.shape[1]
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("fake_quant", ["0", "all"])
def test_oneshot_logits_match_mlx_vlm(setup, ids, monkeypatch, fake_quant):
    cfg, args, official, model = setup
    monkeypatch.setenv("MLX_DSV4_FAKE_QUANT", fake_quant)
    ref = H.reference(cfg, official, fake_quant=fake_quant == "all")
    err = rel(run(model, ids, [T]), H.reference_logits(ref, ids))
    print(f"fake-quant {fake_quant}: relative logit error {err:.2e} over {T} positions")
    assert err < PARITY


@pytest.mark.parametrize("fake_quant", ["0", "kv"])
@pytest.mark.parametrize("chunks", [[1, 3, 5, 31, 33, T - 73], [40] + [1] * (T - 40)])
def test_chunked_and_token_by_token_equal_oneshot(setup, ids, monkeypatch, fake_quant, chunks):
    model = setup[3]
    monkeypatch.setenv("MLX_DSV4_FAKE_QUANT", fake_quant)
    model.compiled_decode = False
    try:
        assert rel(run(model, ids, chunks), run(model, ids, [T])) < SELF
    finally:
        model.compiled_decode = True


def test_the_indexer_selects_and_candidates_restrict(setup, ids, monkeypatch):
    """Guards the fixture: past top-k entries the pools hold more than the attention reads, and
    the candidate blocks leave the later index source fewer entries than it has."""
    monkeypatch.setenv("MLX_DSV4_FAKE_QUANT", "0")
    args, model = setup[1], setup[3]
    from mlx_dsv4.model.v41 import Handoff
    from mlx_dsv4.model.head import embed_streams, first_pre

    cache = make_cache(model)
    x = mx.array(ids)
    rows, X, pre, h = model.engram_rows(x, cache), embed_streams(model, x), first_pre(1, T, 4), Handoff()
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        X, pre = layer(X, pre, x, c, h, rows.get(i))
    assert cache[4].kv_pool.n == T and cache[2].kv_pool.n == T // 2
    assert set(h.topk) == {2, 4, 5} and h.topk[5][0].shape == (1, T, args.index_topk)
    blocks, reachable = (np.array(a)[0, -1] for a in h.candidates)
    assert len(set(blocks.tolist())) == args.candidate_topk_blocks and reachable.all()
    assert args.candidate_topk_blocks * args.candidate_block_size < T  # fewer than the pool holds


def test_batch_rows_are_independent(setup, ids):
    model = setup[3]
    flipped = np.ascontiguousarray(ids[:, ::-1])
    pair = np.concatenate([ids, flipped])
    both = run(model, pair, [60, 1, 1, T - 62])
    assert rel(both[:1], run(model, ids, [T])) < SELF
    assert rel(both[1:], run(model, flipped, [T])) < SELF


def test_snapshot_restore_is_exact(setup, ids):
    model = setup[3]
    cache = make_cache(model)
    model(mx.array(ids[:, :70]), cache)
    snap = [c.snapshot() for c in cache]
    a = np.array(model(mx.array(ids[:, 70:]), cache))
    for c, s in zip(cache, snap):
        c.restore(s)
    b = np.array(model(mx.array(ids[:, 70:]), cache))
    assert np.array_equal(a, b)
