"""A V4.1 model through the generation layer: the prompt cache (its states carry the Engram
history), a session's snapshots, and experts streamed from SSD."""

import mlx.core as mx
import numpy as np
import pytest

import v41_helpers as H
from mlx_dsv4.generation.prompt_cache import PromptCache, capture, restore
from mlx_dsv4.model.cache import make_cache


@pytest.fixture(scope="module")
def model():
    return H.tiny_model()


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(3).integers(3, 256, (1, 100))


def test_a_prompt_cache_state_restores_exactly_through_a_file(model, ids, tmp_path):
    cache = make_cache(model)
    model(mx.array(ids[:, :70]), cache)
    tokens = ids[0, :70].tolist()
    state = capture(cache, tokens)
    pools = state.segments[-1].layers
    assert "engram.tokens" in state.small[1] and "kv_pool.data" in pools[4]
    assert "kv_pool.data" not in pools[5]  # a layer that reads another's pool keeps none
    written = PromptCache("v41", directory=tmp_path, disk_min_tokens=1)
    written.store(tokens, cache)
    assert written.flush(60)
    hit = PromptCache("v41", directory=tmp_path, max_bytes=0).lookup(tokens, len(tokens))
    assert hit is not None and hit.source == "disk" and hit.n == 70
    fresh = make_cache(model)
    restore(fresh, hit.state)
    want = np.array(model(mx.array(ids[:, 70:]), cache))
    got = np.array(model(mx.array(ids[:, 70:]), fresh))
    np.testing.assert_array_equal(got, want)


def test_a_session_rewinds_to_a_snapshot_and_reuses_the_prefix(model, ids):
    from mlx_dsv4.generation.session import Session

    from fakes import ByteTokenizer

    session = Session(model, ByteTokenizer(), max_context=512)
    a = ids[0, :60].tolist()
    session.prefill(a)
    for b, reuse in ((a + ids[0, 60:80].tolist(), 60),  # extends the cache
                     (a[:-1] + ids[0, 80:95].tolist(), 59)):  # rewinds to the snapshot at 59
        got, reused = session.prefill(b)
        assert reused == reuse
        want = model(mx.array([b]), make_cache(model))[0, -1]
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=2e-5)


def test_experts_streamed_from_disk_give_the_resident_logits(tmp_path):
    from mlx_dsv4.convert import convert
    from mlx_dsv4.model.weights import load_model
    from mlx_dsv4.synthetic import tiny_v41_config, write_official_checkpoint

    src = write_official_checkpoint(tmp_path / "src", tiny_v41_config(), shards=2)
    convert(src, tmp_path / "out", recipe="q4")
    x = mx.array(np.random.default_rng(0).integers(3, 256, (1, 40)))
    resident = load_model(tmp_path / "out")
    streamed = load_model(tmp_path / "out", expert_memory=1 << 20)
    assert streamed.expert_store.counters.lookups == 0
    np.testing.assert_array_equal(np.array(streamed(x)), np.array(resident(x)))
    assert streamed.expert_store.counters.misses > 0
