"""Tiny random DeepSeek-V4 models for tests, benchmarks and `dsv4 selftest`.

`tiny_config()` is a small config with every layer kind (sliding, CSA, HCA), the real ratios
4 and 128 and the real 128-token window. `random_weights()` draws every tensor of the official
inventory (official names, logical float32 values) at a scale where it matters: mHC
fn/base/scale, sinks, `ape`, router bias and `tid2eid` all move the logits. `to_model_weights()`
stacks the experts into the layout the MLX model loads.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .config import ModelArgs

_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def tiny_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 256,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 64,
        "o_groups": 2,
        "o_lora_rank": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "num_hash_layers": 2,
        "swiglu_limit": 10.0,
        "sliding_window": 128,
        "compress_ratios": [0, 4, 128, 4, 0],
        "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "index_n_heads": 16,
        "index_head_dim": 32,
        "index_topk": 16,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 1048576,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
    config.update(overrides)
    return config


def random_weights(args: ModelArgs, seed: int = 0, include_mtp: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of the release under its official name, float32 (tid2eid int64)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, role in args.tensors(include_mtp):
        out[name] = _draw(rng, name, shape, role, args)
    return out


def _draw(rng, name: str, shape: tuple[int, ...], role: str, args: ModelArgs) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if role == "index":
        # Distinct experts per token, as a real hash table has.
        rows = [rng.permutation(args.n_routed_experts)[: shape[1]] for _ in range(shape[0])]
        return np.array(rows, dtype=np.int64)
    if role == "norm":
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if role == "embed":
        return rng.standard_normal(shape).astype(np.float32)
    if leaf.endswith("_fn"):
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    if leaf.endswith("_base"):
        return rng.standard_normal(shape).astype(np.float32)
    if leaf.endswith("_scale"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if leaf in ("attn_sink", "ape"):
        return rng.standard_normal(shape).astype(np.float32)
    if name.endswith("gate.bias"):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    # Linear weights [out, in]: unit-variance outputs for unit-variance inputs.
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def to_model_weights(official: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official names -> MLX parameter names: experts stacked `[E, out, in]`, tid2eid int32."""
    out, experts = {}, {}
    for name, value in official.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif name.endswith("tid2eid"):
            out[name] = value.astype(np.int32)
        else:
            out[name] = value
    for (prefix, w), by_index in experts.items():
        out[f"{prefix}.{w}.weight"] = np.stack([by_index[e] for e in sorted(by_index)])
    return out
