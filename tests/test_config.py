"""The released Flash and Pro configs parse into the schedules and parameter counts of spec §1."""


import pytest

from mlx_dsv4.config import CSA, HCA, SLIDING, ConfigError, ModelArgs, released_config


def released(name: str) -> dict:
    return released_config(name)


def test_flash_schedule():
    a = ModelArgs.from_dict(released("flash"))
    kinds = a.layer_kinds
    assert len(kinds) == 43
    assert kinds[:2] == [SLIDING, SLIDING]
    assert [i for i, k in enumerate(kinds) if k == CSA] == list(range(2, 43, 2))
    assert [i for i, k in enumerate(kinds) if k == HCA] == list(range(3, 42, 2))
    assert a.attention_kind(43) == SLIDING  # the MTP block
    assert [a.is_hash_layer(i) for i in range(5)] == [True, True, True, False, False]
    assert not a.is_hash_layer(43)


def test_pro_schedule():
    a = ModelArgs.from_dict(released("pro"))
    kinds = a.layer_kinds
    assert (kinds.count(SLIDING), kinds.count(CSA), kinds.count(HCA)) == (0, 30, 31)
    assert kinds[:3] == [HCA, HCA, CSA]
    assert a.attention_kind(61) == SLIDING


@pytest.mark.parametrize("name,total,trunk,active", [
    ("flash", 290_942_289_362, 284.33e9, 13.80e9),
    ("pro", 1_598_837_347_742, 1573.0e9, 49.78e9),
])
def test_parameter_counts(name, total, trunk, active):
    a = ModelArgs.from_dict(released(name))
    assert a.parameter_count() == total  # published totals, to the parameter
    assert round(a.parameter_count(include_mtp=False) / 1e9, 2) == round(trunk / 1e9, 2)
    assert round(a.active_parameter_count() / 1e9, 2) == round(active / 1e9, 2)


def test_longer_ratio_lists_are_truncated():
    cfg = released("flash")
    cfg["compress_ratios"] = cfg["compress_ratios"] + [0, 0]  # the 0731 refresh ships 46
    a = ModelArgs.from_dict(cfg)
    assert len(a.layer_kinds) == 43


@pytest.mark.parametrize("change,message", [
    ({"model_type": "deepseek_v41"}, "This V4.1 config cannot run: layer 2"),
    ({"text_config": {}}, "neither V4 nor V4.1"),
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"compress_ratios": None}, "no `compress_ratios`"),
    ({"compress_ratios": [0, 0, 4]}, "3 entries but 44 are needed"),
    ({"compress_ratios": [0, 0] + [16] * 42}, "`compress_ratios[2]` is 16"),
    ({"scoring_func": "softmax"}, "'sqrtsoftplus'"),
    ({"n_shared_experts": 2}, "exactly one shared expert"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "only YaRN"),
])
def test_refusals_name_what_is_missing(change, message):
    cfg = released("flash")
    cfg.update(change)
    if change.get("compress_ratios", 1) is None:
        del cfg["compress_ratios"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ModelArgs.from_dict(cfg)


@pytest.mark.parametrize("text,message", [
    ('{"model_type": ', r"config.json is not valid JSON \(Expecting value at line 1, column 16\)"),
    ("[1, 2]", r"config.json holds a JSON list, not an object"),
])
def test_an_unreadable_config_file_is_named(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"^{tmp_path}/" + message):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match=f"^{tmp_path}/config.json is not a text file"):
        ModelArgs.from_file(tmp_path)


def test_a_refused_config_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=f"^{tmp_path}/config.json: model_type 'llama' is not "):
        ModelArgs.from_file(tmp_path / "config.json")


def test_a_value_of_the_wrong_type_is_a_config_error():
    cfg = released("flash")
    cfg["num_hidden_layers"] = "43"
    with pytest.raises(ConfigError, match="a config value has the wrong type"):
        ModelArgs.from_dict(cfg)
