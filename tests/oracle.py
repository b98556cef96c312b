"""The test oracle: transformers' PyTorch DeepseekV4ForCausalLM with our official-named weights.

Only the name table below maps the official checkpoint names onto transformers' names (spec
§4.6); the oracle's code is transformers' own. MTP tensors are not part of that model.
"""

from __future__ import annotations

import re

import numpy as np

_RENAMES = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.hc_attn_(fn|base|scale)$", r"model.layers.\1.attn_hc.\2"),
    (r"^layers\.(\d+)\.hc_ffn_(fn|base|scale)$", r"model.layers.\1.ffn_hc.\2"),
    (r"^layers\.(\d+)\.attn\.attn_sink$", r"model.layers.\1.self_attn.sinks"),
    (r"^layers\.(\d+)\.attn\.indexer\.compressor\.", r"model.layers.\1.self_attn.compressor.indexer.C."),
    (r"^layers\.(\d+)\.attn\.indexer\.wq_b\.", r"model.layers.\1.self_attn.compressor.indexer.q_b_proj."),
    (r"^layers\.(\d+)\.attn\.indexer\.weights_proj\.",
     r"model.layers.\1.self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^layers\.(\d+)\.attn\.compressor\.", r"model.layers.\1.self_attn.compressor.C."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.ffn\.gate\.bias$", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"^layers\.(\d+)\.ffn\.shared_experts\.", r"model.layers.\1.mlp.shared_experts."),
    (r"^layers\.(\d+)\.ffn\.", r"model.layers.\1.mlp."),
]
_LEAVES = {
    "self_attn.wq_a.": "self_attn.q_a_proj.", "self_attn.q_norm.": "self_attn.q_a_norm.",
    "self_attn.wq_b.": "self_attn.q_b_proj.", "self_attn.wkv.": "self_attn.kv_proj.",
    "self_attn.wo_a.": "self_attn.o_a_proj.", "self_attn.wo_b.": "self_attn.o_b_proj.",
    "C.wkv.": "kv_proj.", "C.wgate.": "gate_proj.", "C.norm.": "kv_norm.", "C.ape": "position_bias",
    "shared_experts.w1.": "shared_experts.gate_proj.", "shared_experts.w3.": "shared_experts.up_proj.",
    "shared_experts.w2.": "shared_experts.down_proj.",
}
_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hf_name(official: str) -> str:
    name = official
    for pattern, repl in _RENAMES:
        name, n = re.subn(pattern, repl, name)
        if n:
            break
    for old, new in _LEAVES.items():
        name = name.replace(old, new)
    return name


def hf_state_dict(official: dict[str, np.ndarray]):
    import torch

    state, experts = {}, {}
    for name, value in official.items():
        if name.startswith("mtp."):
            continue
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(int(m.group(1)), {}).setdefault(m.group(3), {})[int(m.group(2))] = value
            continue
        state[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(value))
    for layer, ws in experts.items():
        E = len(ws["w1"])
        w1 = np.stack([ws["w1"][e] for e in range(E)])
        w3 = np.stack([ws["w3"][e] for e in range(E)])
        w2 = np.stack([ws["w2"][e] for e in range(E)])
        p = f"model.layers.{layer}.mlp.experts."
        state[p + "gate_up_proj"] = torch.from_numpy(np.concatenate([w1, w3], axis=1))
        state[p + "down_proj"] = torch.from_numpy(w2)
    return state


def hf_model(config: dict, official: dict[str, np.ndarray]):
    """transformers' model in fp32 on CPU holding exactly `official`'s values."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    keep = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    cfg = DeepseekV4Config(**keep)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    state = hf_state_dict(official)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise AssertionError(f"oracle mapping is off: missing {missing}, unexpected {unexpected}")
    return model


def hf_logits(model, ids: np.ndarray, chunks: list[int] | None = None) -> np.ndarray:
    """Logits for ids `[B, T]`, in one call or fed through a DynamicCache in `chunks`."""
    import torch
    from transformers import DynamicCache

    t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        if not chunks:
            return model(t, use_cache=False).logits.numpy()
        cache, outs, start = DynamicCache(config=model.config), [], 0
        for n in chunks:
            out = model(t[:, start : start + n], past_key_values=cache, use_cache=True)
            outs.append(out.logits.numpy())
            start += n
        return np.concatenate(outs, axis=1)
