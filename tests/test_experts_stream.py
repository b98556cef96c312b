"""Experts read from the shards on demand: same logits as the resident model, counters, budget."""

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dsv4.cache import make_cache
from mlx_dsv4.experts_stream import PAGE, ExpertStore, StreamError
from mlx_dsv4.weights import load_model, shard_files


@pytest.fixture(scope="module")
def resident(selftest_model):
    return load_model(selftest_model)


def expert_bytes(model_dir) -> int:
    """Resident bytes of one expert (all layers of the tiny model have equal experts)."""
    store = ExpertStore(model_dir, shard_files(model_dir), budget=0)
    try:
        (entry,) = store.get("layers.0", [0])
        return sum(a.nbytes for d in entry.values() for a in d.values())
    finally:
        store.close()


def run(model, prompt, steps):
    """Logits of a two-chunk prefill (sorted and unsorted expert paths) and of `steps` decodes."""
    cache = make_cache(model)
    out = [model(prompt[:, :40], cache), model(prompt[:, 40:], cache)]
    tok = mx.argmax(out[-1][:, -1:], axis=-1)
    for _ in range(steps):
        out.append(model(tok, cache))
        tok = mx.argmax(out[-1], axis=-1)
    return [np.array(o) for o in out]


@pytest.mark.parametrize("prefetch", [False, True])
def test_logits_equal_resident_with_a_cache_smaller_than_the_experts(selftest_model, resident,
                                                                     prefetch):
    n_experts = resident.args.n_routed_experts
    budget = 3 * expert_bytes(selftest_model)  # fewer than one layer's experts
    streamed = load_model(selftest_model, expert_memory=budget, prefetch=prefetch)
    store = streamed.expert_store
    assert not [k for k, _ in tree_flatten(streamed.parameters()) if ".experts." in k]
    prompt = mx.array(np.random.default_rng(3).integers(2, resident.args.vocab_size, (1, 46)))
    want, got = run(resident, prompt, 6), run(streamed, prompt, 6)
    assert len(got) == 8
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    c = store.counters
    assert c.misses > n_experts and c.evictions > 0  # the cache really was too small
    assert 0 < store.resident_bytes <= budget
    assert c.bytes_read >= c.misses * expert_bytes(selftest_model) * 0.5  # packed + scales
    store.close()


def test_a_repeated_prompt_is_served_from_the_cache(selftest_model, resident):
    streamed = load_model(selftest_model, expert_memory=1 << 30, prefetch=False)
    store = streamed.expert_store
    prompt = mx.array(np.random.default_rng(4).integers(2, resident.args.vocab_size, (1, 30)))
    first = np.array(streamed(prompt, make_cache(streamed)))
    cold = store.counters.copy()
    assert cold.misses > 0 and cold.hits >= 0 and cold.bytes_read > 0
    again = np.array(streamed(prompt, make_cache(streamed)))
    warm = store.counters.since(cold)
    np.testing.assert_array_equal(again, first)
    assert (warm.misses, warm.bytes_read, warm.prefetched) == (0, 0, 0)
    assert warm.hits == cold.misses + cold.hits  # the same picks, all resident now
    assert warm.hit_rate == 1.0
    store.close()


def test_misses_then_hits_and_page_aligned_reads(selftest_model):
    store = ExpertStore(selftest_model, shard_files(selftest_model), budget=1 << 30)
    a = store.get("layers.1", [2, 5])
    assert (store.counters.misses, store.counters.hits) == (2, 0)
    read = store.counters.bytes_read
    assert read > 0 and read % PAGE == 0
    b = store.get("layers.1", [5, 2])
    assert (store.counters.misses, store.counters.hits, store.counters.bytes_read) == (2, 2, read)
    assert b[0] is a[1] and b[1] is a[0]
    store.close()


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used(selftest_model):
    one = expert_bytes(selftest_model)
    store = ExpertStore(selftest_model, shard_files(selftest_model), budget=int(2.5 * one))
    for e in (0, 1, 0, 2):  # 0 is used again before 2 arrives, so 1 is the oldest
        store.get("layers.2", [e])
        assert store.resident_bytes <= store.budget
    assert store.counters.evictions == 1 and store.resident_bytes == 2 * one
    store.get("layers.2", [0])
    assert store.counters.hits == 2
    store.get("layers.2", [1])
    assert store.counters.misses == 4  # 0, 1, 2 and 1 again
    store.close()


def test_an_expert_larger_than_the_budget_still_computes(selftest_model, resident):
    streamed = load_model(selftest_model, expert_memory=1, prefetch=False)
    prompt = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(streamed(prompt)), np.array(resident(prompt)))
    assert streamed.expert_store.resident_bytes == 0
    streamed.expert_store.close()


def test_a_directory_without_stacked_experts_is_refused(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {"layers.0.ffn.experts.w1.weight": mx.zeros((4, 8, 2), mx.uint32)})
    with pytest.raises(StreamError, match="layers.0 lacks some of its expert tensors"):
        ExpertStore(tmp_path, [tmp_path / "model.safetensors"], budget=1 << 20)
