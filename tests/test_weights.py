"""Loading a converted directory: strict by name and shape, quantized per the config block."""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dsv4.model.weights import LoadError, load_model


def write_dir(path, cfg, tensors, quantization=None, shards=2):
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, **({"quantization": quantization} if quantization else {}))
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(path / fname), {n: tensors[n] for n in part}, metadata={"format": "mlx"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def params(model):
    return dict(tree_flatten(model.parameters()))


def test_plain_directory_round_trip(tmp_path, tiny_cfg, tiny_model, token_ids):
    d = write_dir(tmp_path / "m", tiny_cfg, params(tiny_model))
    loaded = load_model(d)
    ids = mx.array(token_ids[:, :40])
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(tiny_model(ids)))


def test_missing_tensor_is_named(tmp_path, tiny_cfg, tiny_model):
    tensors = params(tiny_model)
    del tensors["layers.1.attn.indexer.wq_b.weight"]
    d = write_dir(tmp_path / "m", tiny_cfg, tensors)
    with pytest.raises(LoadError, match=r"missing 1 tensor\(s\): layers\.1\.attn\.indexer\.wq_b\.weight"):
        load_model(d)


def test_extra_tensor_is_named(tmp_path, tiny_cfg, tiny_model):
    tensors = params(tiny_model)
    tensors["layers.0.attn.bogus.weight"] = mx.zeros((2, 2))
    d = write_dir(tmp_path / "m", tiny_cfg, tensors)
    with pytest.raises(LoadError, match=r"unexpected 1 tensor\(s\): layers\.0\.attn\.bogus\.weight"):
        load_model(d)


def test_wrong_shape_is_named(tmp_path, tiny_cfg, tiny_model):
    tensors = params(tiny_model)
    tensors["layers.2.attn.wkv.weight"] = mx.zeros((3, 64))
    d = write_dir(tmp_path / "m", tiny_cfg, tensors)
    with pytest.raises(LoadError, match=r"layers\.2\.attn\.wkv\.weight has shape \(3, 64\)"):
        load_model(d)


def test_missing_shard_is_named(tmp_path, tiny_cfg, tiny_model):
    d = write_dir(tmp_path / "m", tiny_cfg, params(tiny_model))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="model-00002-of-00002.safetensors"):
        load_model(d)


def quantize_like_converter(model):
    """mxfp4 experts, affine 4-bit attention and shared experts, 8-bit embed/head, mxfp8 wo_b."""
    quant = {"group_size": 64, "bits": 4, "mode": "affine"}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or ".compressor." in path or path.endswith("gate"):
            return False
        if ".experts." in path:
            quant[path] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        elif path in ("embed", "head"):
            quant[path] = {"group_size": 64, "bits": 8, "mode": "affine"}
        elif path.endswith("wo_b"):
            quant[path] = {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        else:
            return True
        return quant[path]

    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    return quant


def test_quantized_directory_round_trip(tmp_path, tiny_cfg, tiny_args, tiny_official, token_ids):
    from conftest import build_model

    model = build_model(tiny_args, tiny_official)
    quant = quantize_like_converter(model)
    mx.eval(model.parameters())
    tensors = params(model)
    assert tensors["layers.1.ffn.experts.w1.scales"].dtype == mx.uint8  # e8m0 scales
    assert "layers.1.attn.wo_a.biases" in tensors  # grouped linear quantized too
    d = write_dir(tmp_path / "q", tiny_cfg, tensors, quantization=quant)
    loaded = load_model(d)
    ids = mx.array(token_ids[:, :40])
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(model(ids)))


def test_loading_fuses_gate_and_up_without_changing_names_bytes_or_logits(
        tmp_path, tiny_cfg, tiny_args, tiny_official, token_ids):
    from conftest import build_model
    from mlx_dsv4.model.cache import make_cache

    model = build_model(tiny_args, tiny_official)
    quant = quantize_like_converter(model)
    mx.eval(model.parameters())
    d = write_dir(tmp_path / "q", tiny_cfg, params(model), quantization=quant)
    loaded = load_model(d)
    assert all(b.ffn.experts.w13 is not None and b.ffn.shared_experts.w13 is not None
               for b in loaded.layers)
    ours, theirs = params(loaded), params(model)
    assert sorted(ours) == sorted(theirs)  # still a dictionary match on checkpoint names
    assert sum(a.nbytes for a in ours.values()) == sum(a.nbytes for a in theirs.values())
    for name in ("layers.1.ffn.experts.w3.weight", "layers.0.ffn.shared_experts.w1.scales"):
        np.testing.assert_array_equal(np.array(ours[name]), np.array(theirs[name]))
    # Prefill (sorted expert path) then one-token steps (unsorted path): bit for bit.
    ca, cb = make_cache(loaded), make_cache(model)
    for s0, s1 in ((0, 30), (30, 31), (31, 32)):
        ids = mx.array(token_ids[:, s0:s1])
        np.testing.assert_array_equal(np.array(loaded(ids, ca)), np.array(model(ids, cb)))
