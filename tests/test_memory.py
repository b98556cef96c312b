"""Memory honesty: pool bytes and planner figures against spec §5, and what 8-bit pools cost."""


import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.config import ModelArgs, released_config
from mlx_dsv4.model.model import Model, keep_float32
from mlx_dsv4.plan import GiB, PlanError, parse_size, plan_memory, weight_bytes, weight_bytes_from_dir
from mlx_dsv4.synthetic import random_weights, to_model_weights

MiB = 1 << 20
# Spec §5.1: bytes of growing state per token and the fixed per-sequence extras.
SPEC_KV = {"flash": {None: 6880, 8: 3655}, "pro": {None: 9848, 8: 5232}}
SPEC_FIXED = {"flash": 17 * MiB, "pro": 26 * MiB}


def released(name):
    return ModelArgs.from_dict(released_config(name))


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("tokens", [1, 4096, 131072, 1048576])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_cache_nbytes_match_spec_arithmetic(name, tokens, kv_bits):
    args = released(name)
    cache = make_cache(args, dtype=mx.bfloat16, max_tokens=tokens, kv_bits=kv_bits)  # lazy: no RAM
    spec = SPEC_KV[name][kv_bits] * tokens + SPEC_FIXED[name]
    ours = sum(c.nbytes for c in cache)
    assert abs(ours - spec) / spec < 0.05, (ours, spec)


@pytest.mark.parametrize("name,recipe,mtp,spec_gib", [
    ("flash", "official", True, 148.6), ("pro", "official", True, 805.3),
    ("flash", "native", True, 148.8), ("flash", "native", False, 145.5),
    ("pro", "native", True, 806.0), ("pro", "native", False, 793.0),
    ("flash", "q8", True, 147.8), ("pro", "q8", False, 791.3),
])
def test_weight_bytes_match_spec_table(name, recipe, mtp, spec_gib):
    ours = weight_bytes(released(name), recipe, include_mtp=mtp) / GiB
    assert abs(ours - spec_gib) / spec_gib < 0.01, ours


@pytest.mark.parametrize("name,kv_bits", [("flash", None), ("flash", 8), ("pro", None), ("pro", 8)])
def test_planner_kv_per_token_matches_spec(name, kv_bits):
    p = plan_memory(released(name), context=1 << 20, kv_bits=kv_bits, memory=parse_size("256GB"))
    assert abs(p.kv_bytes_per_token - SPEC_KV[name][kv_bits]) / SPEC_KV[name][kv_bits] < 0.01
    assert abs(p.fixed_bytes - SPEC_FIXED[name]) / SPEC_FIXED[name] < 0.05


def test_flash_q4_fits_a_256gb_mac_at_one_million_tokens():
    p = plan_memory(released("flash"), context=1 << 20, recipe="q4", memory=parse_size("256GB"))
    assert p.fits and p.largest_context == 1 << 20
    assert 140 * GiB < p.weight_bytes < 150 * GiB
    assert p.headroom_bytes > 50 * GiB
    assert p.verdict().startswith("fits:") and "to spare" in p.verdict()


def test_pro_says_what_it_needs():
    p = plan_memory(released("pro"), context=1 << 20, recipe="q4", memory=parse_size("256GB"))
    assert not p.fits and p.largest_context == 0
    assert "does not fit at any context" in p.verdict() and "794" in p.verdict()


def test_largest_context_is_where_the_budget_runs_out():
    args = released("flash")
    weights = plan_memory(args, context=1, recipe="q4", memory=parse_size("256GB")).weight_bytes
    # A machine whose budget (after the 10% OS reserve) is the weights + 3 GiB.
    memory = int((weights + 3 * GiB) / 0.9) + 1
    p = plan_memory(args, context=1 << 20, recipe="q4", memory=memory)
    assert not p.fits and 100_000 < p.largest_context < 1 << 20
    at = plan_memory(args, context=p.largest_context, recipe="q4", memory=memory)
    over = plan_memory(args, context=p.largest_context + 4096, recipe="q4", memory=memory)
    assert at.fits and not over.fits


def _bf16_model(args, weights, dtype):
    m = Model(args)
    m.load_weights([(k, mx.array(v).astype(dtype) if v.dtype == np.float32 and not keep_float32(k)
                     else mx.array(v)) for k, v in weights.items()])
    nn.quantize(m, class_predicate=lambda p, _: {"group_size": 32, "bits": 4, "mode": "mxfp4"}
                if ".experts.w" in p else False)
    return m


def test_8bit_pools_drift_is_small_next_to_bf16_rounding(tiny_args, tiny_official, token_ids):
    """8-bit pools move logits far less than running the model in bf16 at all does."""
    weights = to_model_weights(tiny_official)
    bf16, fp32 = _bf16_model(tiny_args, weights, mx.bfloat16), _bf16_model(tiny_args, weights, mx.float32)
    ids = mx.array(token_ids[:, :600])
    ref = np.array(fp32(ids, make_cache(fp32)))
    plain = np.array(bf16(ids, make_cache(bf16)))
    kv8 = np.array(bf16(ids, make_cache(bf16, kv_bits=8)))
    drift = np.abs(kv8 - plain).max(-1).mean()
    bf16_err, kv8_err = np.abs(plain - ref).max(-1).mean(), np.abs(kv8 - ref).max(-1).mean()
    print(f"8-bit pools vs bf16 pools: mean max-abs drift {drift:.3f}; error vs fp32: "
          f"bf16 {bf16_err:.3f}, bf16 + 8-bit pools {kv8_err:.3f}")
    assert drift < 0.5 * bf16_err          # measured ~0.06 vs ~0.25
    assert kv8_err < 1.1 * bf16_err        # measured +2%
    cache = make_cache(bf16, kv_bits=8, max_tokens=600)
    full = make_cache(bf16, max_tokens=600)
    pools = lambda c: sum(p.nbytes for l in c for p in (l.kv_pool, l.index_pool) if p is not None)  # noqa: E731
    assert pools(cache) / pools(full) == pytest.approx(544 / 1024, rel=0.02)


@pytest.mark.parametrize("context", [0, -5, (1 << 20) + 1])
def test_a_context_the_model_cannot_hold_is_refused(context):
    with pytest.raises(PlanError, match=f"A context of {context:,} tokens is outside what config "
                                        r"supports \(1 to 1,048,576\)"):
        plan_memory(released("flash"), context=context, memory=parse_size("256GB"))


@pytest.mark.parametrize("text", ["", "GB", "1.2.3GB", "5 XB", "4iB", "-1GB"])
def test_sizes_that_are_not_sizes(text):
    with pytest.raises(ValueError, match="is not a size like 256GB"):
        parse_size(text)


@pytest.mark.parametrize("data", [b"\x01\x02", (1 << 40).to_bytes(8, "little") + b"{}",
                                  (4).to_bytes(8, "little") + b"nope"])
def test_a_corrupt_shard_header_is_named(tmp_path, data):
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(data)
    with pytest.raises(PlanError, match="model-00001-of-00001.safetensors is truncated or not a "
                                        "safetensors file"):
        weight_bytes_from_dir(tmp_path)


def test_fixed_state_counts_the_mtp_window_ring():
    from mlx_dsv4.config import ModelArgs
    from mlx_dsv4.plan import state_bytes
    from mlx_dsv4.synthetic import tiny_config

    with_mtp = ModelArgs.from_dict(tiny_config())
    without = ModelArgs.from_dict(tiny_config(num_nextn_predict_layers=0))
    ring = with_mtp.sliding_window * with_mtp.head_dim * 2  # bf16 rows of one window
    assert state_bytes(with_mtp, 1024, None)[1] - state_bytes(without, 1024, None)[1] == ring
    assert state_bytes(with_mtp, 1024, None)[0] == state_bytes(without, 1024, None)[0]


def test_memory_kept_for_the_prompt_cache_comes_off_the_budget():
    from mlx_dsv4.plan import plan_memory

    base = plan_memory("flash", context=8192, memory=256 * GiB)
    kept = plan_memory("flash", context=8192, memory=256 * GiB, other_bytes=4 * GiB)
    assert kept.budget_bytes == base.budget_bytes - 4 * GiB
    assert "prompt cache" in kept.budget_source
    assert kept.largest_context <= base.largest_context


# ----- several sequences (serve --max-batch) -------------------------------------------------------

def test_a_batch_plans_each_sequence_state_and_the_step_over_all_rows():
    one, eight = (plan_memory(released("flash"), context=1 << 18, recipe="q4", memory=parse_size("256GB"),
                              batch=n) for n in (1, 8))
    assert eight.kv_bytes == 8 * one.kv_bytes and eight.fixed_bytes == 8 * one.fixed_bytes
    assert eight.decode_bytes == 8 * one.decode_bytes and eight.prefill_bytes == one.prefill_bytes
    assert eight.weight_bytes == one.weight_bytes
    assert eight.total_bytes - one.total_bytes == 7 * (one.kv_bytes + one.fixed_bytes)  # prefill peaks
    assert eight.fits and eight.largest_context == 1 << 20


def test_a_batch_that_does_not_fit_is_refused_and_the_default_is_what_fits():
    from mlx_dsv4.plan import default_batch

    many = plan_memory(released("flash"), context=1 << 18, recipe="q4", memory=parse_size("256GB"), batch=64)
    assert not many.fits and 0 < many.largest_context < 1 << 18  # each of 64 would fit less
    # 1M tokens a sequence: ~6.9 GiB of state each beside ~145 GiB of weights in ~230 GiB.
    p = plan_memory(released("flash"), context=1 << 20, recipe="q4", memory=parse_size("256GB"))
    n = default_batch(p, released("flash"), memory=parse_size("256GB"), recipe="q4")
    assert 1 < n < 64
    assert plan_memory(released("flash"), context=1 << 20, recipe="q4", memory=parse_size("256GB"),
                       batch=n).fits
    if n < 8:
        assert not plan_memory(released("flash"), context=1 << 20, recipe="q4",
                               memory=parse_size("256GB"), batch=n + 1).fits
    with pytest.raises(PlanError, match="A batch of 0 sequences"):
        plan_memory(released("flash"), context=1024, batch=0)
