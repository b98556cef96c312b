"""The released V4.1-Flash config parses: nesting flattened, the shared-pool roles, refusals."""

import pytest

from mlx_dsv4.config import SHARED, SLIDING, ConfigError, ModelArgs, released_config


def v41() -> dict:
    return released_config("v41-flash")


def test_the_release_is_found_by_every_name():
    for name in ("v41-flash", "deepseek-ai/DeepSeek-V4.1-Flash", "deepseek-ai/DeepSeek-V4.1-Flash-1017"):
        assert released_config(name)["model_type"] == "deepseek_v41"
    assert released_config("someone/DeepSeek-V4.1-Flash") is None
    assert released_config("flash")["model_type"] == "deepseek_v4"


def test_nesting_is_flattened_and_the_dspark_stages_are_not_mtp():
    a = ModelArgs.from_dict(v41())
    assert (a.hidden_size, a.num_hidden_layers, a.q_lora_rank, a.n_routed_experts) == (5120, 40, 1280, 384)
    assert a.rms_norm_eps == 1e-20 and a.num_hash_layers == 0 and not a.is_hash_layer(0)
    assert a.num_nextn_predict_layers == 0  # the 3 next-n layers are DSpark stages
    assert a.fp8_block == 32 and a.engram_hash_columns == 24
    assert a.extra["vision_config"]["patch_size"] == 14
    assert (a.bos_token_id, a.eos_token_id) == (0, 1)


def test_the_shared_pool_roles():
    a = ModelArgs.from_dict(v41())
    assert a.layer_kinds[:2] == [SLIDING, SLIDING] and a.layer_kinds[2:] == [SHARED] * 38
    assert [i for i in range(40) if a.owns_pool(i)] == [2, 8, 14, 20]
    assert [a.pool_source(i) for i in (2, 7, 8, 19, 20, 39)] == [2, 2, 8, 14, 20, 20]
    assert [a.index_source(i) for i in (3, 23, 24, 27, 39)] == [2, 20, 24, 24, 36]
    assert [i for i in range(40) if a.uses_candidates(i)] == [24, 28, 32, 36]
    assert a.pool_source(0) is None and a.index_source(1) is None


def test_parameter_counts_count_engram_rows_read_as_active():
    a = ModelArgs.from_dict(v41())
    engram = (384006168 + 384016682) * 256
    experts = 40 * 384 * 3 * 5120 * 2304
    assert a.parameter_count() > engram + experts
    idle = 40 * 378 * 3 * 5120 * 2304 + engram - 2 * 24 * 256
    assert a.active_parameter_count() == a.parameter_count() - idle


@pytest.mark.parametrize("change,message", [
    ({"kv_source_layer_ids": [2, 8, 14]}, "layer 20 (ratio 1) has no kv source layer of the same ratio"),
    ({"kv_source_layer_ids": [2, 8, 14, 20, 0]}, "kv source layer 0 has ratio 0"),
    ({"index_source_layer_ids": [2, 8, 20]}, "layer 14 has no index source layer at or before it"),
    ({"candidate_source_layer_id": 21}, "the candidate source layer 21 is not an index source"),
    ({"engram_num_embeddings": [5]}, "one table size per Engram layer"),
    ({"compress_ratios": [0, 0, 4] + [2] * 17 + [1] * 23}, "layer 3 (ratio 2) has no kv source layer"),
])
def test_schedules_that_cannot_run_are_refused(change, message):
    cfg = v41()
    cfg["text_config"].update(change)
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(cfg)
    assert message in str(e.value)
