"""A tiny random DeepSeek-V4.1 for tests: our model with its Engram tables in memory, and the
same weights in mlx-vlm 0.7.10's V4.1 language model (the parity oracle)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_dsv4.config import ModelArgs
from mlx_dsv4.model.engram import EngramArray, EngramHash
from mlx_dsv4.model.v41 import Model41
from mlx_dsv4.synthetic import (engram_tables, random_weights, tiny_token_map, tiny_v41_config,
                                to_model_weights)


def config(**overrides) -> dict:
    return tiny_v41_config(**overrides)


def weights(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    return random_weights(args, seed=seed)


def build(args: ModelArgs, official: dict, dtype=mx.float32, token_map=None) -> Model41:
    model = Model41(args)
    w = to_model_weights(official)
    model.load_weights([(k, mx.array(v).astype(dtype) if v.dtype == np.float32 and not
                         k.endswith(("_fn", "_base", "_scale", "attn_sink", "gate.bias", "gate.weight"))
                         else mx.array(v)) for k, v in w.items()], strict=True)
    for layer, table in engram_tables(official).items():
        model.layers[layer].engram.table = EngramArray(mx.array(table).astype(dtype))
    model.engram_hash = EngramHash(args, np.array(token_map or tiny_token_map(args.vocab_size)))
    mx.eval(model.parameters())
    return model


def tiny_model() -> Model41:
    """The tiny V4.1 of `config()` with its seed-0 weights, in fp32."""
    args = ModelArgs.from_dict(config())
    return build(args, weights(args))


def reference(cfg: dict, official: dict, dtype=mx.float32, token_map=None, fake_quant=False):
    """mlx-vlm's `LanguageModel` with these weights (skips the test when mlx-vlm is missing);
    its fake-quant (on by default there) follows `fake_quant`."""
    import vlm_reference

    vlm_reference.load("fakequant").DISABLE = not fake_quant
    language = vlm_reference.load("language")
    config_mod = vlm_reference.load("config")
    engram = vlm_reference.load("engram")
    conf = config_mod.ModelConfig.from_dict(cfg)
    model = language.LanguageModel(conf)
    args = ModelArgs.from_dict(cfg)
    out, experts = {}, {}
    for name, v in official.items():
        parts = name.split(".")
        if ".ffn.experts." in name:
            experts.setdefault((parts[1], parts[5]), {})[int(parts[4])] = v
            continue
        key = {"embed.weight": "embed_tokens.weight"}.get(name, name)
        for old, new in ((".shared_experts.w1.", ".shared_experts.gate_proj."),
                         (".shared_experts.w2.", ".shared_experts.down_proj."),
                         (".shared_experts.w3.", ".shared_experts.up_proj.")):
            key = key.replace(old, new)
        if key.endswith(".attn.wo_a.weight"):
            v = v.reshape(args.o_groups, args.o_lora_rank, -1)
        out[key] = v
    proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for (layer, w), by_e in experts.items():
        out[f"layers.{layer}.ffn.switch_mlp.{proj[w]}.weight"] = np.stack([by_e[e] for e in sorted(by_e)])
    for i in range(args.num_hidden_layers):
        out[f"layers.{i}.ffn.gate.bias_vl"] = out[f"layers.{i}.ffn.gate.bias"]
    f32 = ("_fn", "_base", "_scale", "attn_sink", "gate.bias", "gate.bias_vl", "gate.weight", "head.weight")
    model.load_weights([(k, mx.array(v) if k.endswith(f32) else mx.array(v).astype(dtype))
                        for k, v in out.items()], strict=True)
    model.engram_hash = engram.NgramHashState(conf, model.layout,
                                              token_map=token_map or tiny_token_map(args.vocab_size))
    mx.eval(model.parameters())
    return model


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    cache = model.make_cache()
    return np.array(model(mx.array(ids), cache=cache).logits.astype(mx.float32))
