"""`dsv4 plan v41-flash`: the shared pools' bytes per token (bf16, 8-bit, FP4) equal the formula,
the Engram tables count as disk, a 256 GB Mac gets a recipe with a 1M context, a 128 GB Mac a
streamed plan."""

import json

import pytest

from mlx_dsv4.config import ModelArgs, released_config
from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.plan import GiB, plan_memory, plan_recipes, state_bytes, weight_bytes

V41 = ModelArgs.from_dict(released_config("v41-flash"))
M = 1 << 20


def theory(args: ModelArgs, entry: float, key: float) -> float:
    """Bytes per token: each pool owner stores one entry and one index key per `ratio` tokens."""
    return sum((entry + key) / args.compress_ratio(i) for i in args.kv_source_layer_ids)


@pytest.mark.parametrize("kv_bits,entry,key", [
    (None, 512 * 2, 128 * 2),  # bf16
    (8, 512 + 8 * 4, 128 + 2 * 4),  # affine 8-bit, bf16 scale and bias per 64
    (4, 512 / 2 + 512 / 16, 128 / 2 + 128 / 32),  # nvfp4 (e4m3 scale per 16), mxfp4 (e8m0 per 32)
])
def test_bytes_per_token_of_the_shared_pools_are_the_theory(kv_bits, entry, key):
    pools, fixed = state_bytes(V41, M, kv_bits)
    assert pools / M == theory(V41, entry, key)
    assert {None: 3200, 8: 1700, 4: 890}[kv_bits] == pools / M
    # Fixed: 40 rings of 128 x 512 bf16, three ratio-2 owners' rows (2 x 2 x 512 fp32), and the
    # two Engram layers' last three token ids.
    assert fixed == 40 * 128 * 512 * 2 + 3 * 2 * 2 * 512 * 4 + 2 * 3 * 4


def test_only_the_owners_hold_pools():
    cache = make_cache(V41, max_tokens=1000)
    assert [i for i, c in enumerate(cache) if c.kv_pool is not None] == [2, 8, 14, 20]
    assert [i for i, c in enumerate(cache) if c.compressor is not None] == [2, 8, 14]
    assert [i for i, c in enumerate(cache) if c.engram is not None] == [1, 14]


def test_engram_counts_as_disk_not_memory():
    p = plan_memory("v41-flash", context=4096, recipe="experts2", memory=256 * GiB)
    rows = sum(V41.engram_num_embeddings)
    assert p.engram_bytes == rows * (256 + 8) and round(p.engram_bytes / GiB, 1) == 188.8
    assert p.engram_read_bytes == 2 * 24 * 264
    assert p.weight_bytes == weight_bytes(V41, "experts2") < 150 * GiB
    assert weight_bytes(V41, "official") < (40 * 384 * 3 * 5120 * 2304 * 4.25 / 8 + 12e9)


def test_a_256_gb_mac_fits_a_recipe_with_a_million_tokens_and_a_128_gb_mac_streams():
    fits = {p.recipe: p.largest_context for p in plan_recipes("v41-flash", context=M, memory=256 * GiB)}
    assert fits["experts2"] == fits["experts3"] == M and fits["attn4"] == 0
    small = plan_recipes("v41-flash", context=M, memory=128 * GiB)
    assert not any(p.largest_context for p in small)
    streamed = plan_recipes("v41-flash", context=M, memory=128 * GiB, expert_memory="auto")
    assert all(p.streams and p.fits and p.largest_context == M for p in streamed)


def test_fp4_pools_are_refused_for_v4():
    from mlx_dsv4.plan import PlanError

    with pytest.raises(PlanError, match="official FP4 formats"):
        plan_memory("flash", context=4096, kv_bits=4, memory=256 * GiB)


def test_a_converted_v41_plans_from_its_shards_and_leaves_the_tables_on_disk(tmp_path):
    from mlx_dsv4.convert import convert
    from mlx_dsv4.synthetic import tiny_v41_config, write_official_checkpoint

    src = write_official_checkpoint(tmp_path / "src", tiny_v41_config(), shards=2)
    out = tmp_path / "out"
    convert(src, out, recipe="attn4")
    p = plan_memory(out, context=1024, memory=8 * GiB)
    tables = sum(f.stat().st_size for f in (out / "engram").iterdir())
    shards = sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert p.weight_bytes < shards and 0 < tables - p.engram_bytes < 4096  # headers aside
    assert json.loads((out / "config.json").read_text())["mlx_dsv4"]["recipe"] == "attn4"
