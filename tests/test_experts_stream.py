"""Experts read from the shards on demand: same logits as the resident model, counters, budget."""

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.model.experts_stream import PAGE, ExpertStore, StreamError
from mlx_dsv4.model.weights import load_model, shard_files


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
    # Decode steps guess the next top-k layer's picks (layer 2 for 3); prefill chunks do not.
    assert (c.read_ahead > 0) == prefetch and c.prefetched <= c.read_ahead
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


# ----- planning and benchmarking the streamed setup ------------------------------------------------

def test_flash_on_a_64gb_mac_streams_its_experts():
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app
    from mlx_dsv4.config import ModelArgs, released_config
    from mlx_dsv4.plan import GiB, expert_bytes, parse_size, plan_memory

    args = ModelArgs.from_dict(released_config("flash"))
    e = expert_bytes(args, "attn4")
    assert e.each == 3 * 2048 * 4096 * 17 // 32  # mxfp4: 4 bits and one scale byte per 32
    assert e.per_token == 6 * 43 * e.each
    resident = plan_memory("flash", context=1 << 16, recipe="attn4", memory=parse_size("256GB"),
                           expert_memory="auto")
    assert not resident.streams and resident.ssd_bytes_per_token() == 0  # it fits: no streaming
    p = plan_memory("flash", context=1 << 16, recipe="attn4", memory=parse_size("64GB"),
                    expert_memory="auto")
    assert p.streams and p.fits and p.total_bytes <= p.budget_bytes
    assert 30 * GiB < p.expert_memory < e.total and p.budget_bytes - p.total_bytes < 1 << 20
    assert p.resident_weight_bytes == p.weight_bytes - e.total + p.expert_memory
    assert p.ssd_bytes_per_token(0.5) == round(e.per_token / 2)
    assert p.ssd_bytes_per_token() == round(e.per_token * (1 - p.expert_memory / e.total))
    r = CliRunner().invoke(app, ["plan", "flash", "--memory", "64GB", "--hit-rate", "0.5"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "Streams experts from SSD: attn4 holds" in text
    assert f"each token reads {e.per_token / 2e9:,.2f} GB from SSD at a 50% hit rate" in text


def test_a_given_expert_memory_is_planned_and_too_little_memory_is_still_refused(selftest_model):
    from mlx_dsv4.plan import expert_bytes_from_dir, plan_memory, weight_bytes_from_dir

    store = ExpertStore(selftest_model, shard_files(selftest_model), budget=0)
    args = load_model(selftest_model, lazy=True).args
    e = expert_bytes_from_dir(selftest_model, args)
    assert e.total == sum(store.expert_bytes(k) * layer.experts for k, layer in store.layers.items())
    assert e.each == store.expert_bytes("layers.0")
    store.close()
    p = plan_memory(selftest_model, context=256, expert_memory=3 * e.each)
    assert p.resident_weight_bytes == weight_bytes_from_dir(selftest_model) - e.total + 3 * e.each
    assert "does not fit" in plan_memory("pro", context=1 << 20, memory=1 << 30,
                                         expert_memory="auto").verdict()


def test_bench_reports_expert_counters(selftest_model):
    from typer.testing import CliRunner

    from mlx_dsv4.bench import run_bench
    from mlx_dsv4.cli import app

    one = expert_bytes(selftest_model)
    r = run_bench(selftest_model, prompt_tokens=40, gen_tokens=6, expert_memory=4 * one, draft=0)
    c = r.experts
    assert r.plan.expert_memory == 4 * one and r.prefill_read > 0
    assert c.lookups == 5 * 4 * 2  # 5 decode steps of 4 layers picking k=2 distinct experts
    assert c.misses > 0 and c.bytes_read >= c.misses * one // 2
    out = CliRunner().invoke(app, ["bench", str(selftest_model), "--prompt", "16", "--tokens", "3",
                                   "--expert-memory", "1MB", "--no-mtp"])
    assert out.exit_code == 0, out.output
    for text in ("expert cache (1.00 MiB)", "read from SSD per decoded token", "hits ("):
        assert text in out.output


def test_a_truncated_shard_names_the_expert_it_could_not_read(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {f"layers.0.ffn.experts.{w}.weight": mx.ones((4, 8, 2048), mx.uint32)
                         for w in ("w1", "w2", "w3")})
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # the last expert of the last tensor loses its tail
    store = ExpertStore(tmp_path, [f], budget=1 << 30)
    store.get("layers.0", [0])  # early experts are intact
    with pytest.raises(StreamError, match=r"expert 3 of layers\.0\.ffn\.experts\.w\d\.weight in .* truncated"):
        store.get("layers.0", [3])
    store.close()


@pytest.mark.parametrize("value", ["lots", "0"])
def test_a_bad_expert_memory_is_a_usage_error(value):
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app

    r = CliRunner().invoke(app, ["plan", "flash", "--expert-memory", value])
    assert r.exit_code == 2 and "Or 'auto'." in " ".join(r.output.split()), r.output
