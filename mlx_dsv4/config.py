"""Model configuration: `ModelArgs` read from an official DeepSeek-V4 `config.json`.

Owns the hyper-parameters, the per-layer schedule (sliding / CSA / HCA attention, hash / top-k
MoE), the two RoPE frequency tables, and the logical tensor inventory of spec §4.3 that the
converter, the planner and the parameter counts are derived from. No MLX import: everything here
is plain Python so the planner and the converter's dry run work without touching a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SLIDING, CSA, HCA = "sliding", "csa", "hca"
_RATIO_KIND = {0: SLIDING, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """A config.json this runtime cannot run, with a sentence saying why."""


def load_json(path: str | Path, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file when it holds something else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from e
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a text file ({e.reason} at byte {e.start}).") from e
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


# Parameters the reference keeps in fp32; the converter stores them so (every recipe) and the
# model reads them as fp32 whatever their stored dtype. Plain Python: the converter's plan and
# the memory planner use the rule without importing the model.
KEEP_FLOAT32 = ("hc_*", ".attn_sink", ".gate.bias", ".gate.weight", ".ape")


def keep_float32(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("hc_") or any(("." + name).endswith(k) for k in KEEP_FLOAT32[1:])


def list_names(names: list[str], most: int = 10) -> str:
    """`a, b, c and 7 more`: tensor names in an error message."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# The released configs ship with the package so the planner can answer before any download.
RELEASED = {"flash": "deepseek-ai/DeepSeek-V4-Flash", "pro": "deepseek-ai/DeepSeek-V4-Pro"}


def released_config(name: str) -> dict[str, Any] | None:
    """The config.json of a release named `flash`, `pro` or by its repo id (a `-0731` refresh
    shares its base's shapes); None for anything else."""
    key = str(name).lower().split("/")[-1].removeprefix("deepseek-v4-").split("-")[0]
    if key not in RELEASED or ("/" in str(name) and not str(name).lower().startswith("deepseek-ai/")):
        return None
    return json.loads((Path(__file__).parent / "configs" / f"{key}.json").read_text())


@dataclass
class ModelArgs:
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    compress_ratios: list[int] | None = None
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int | list[int] = 1
    # MLX per-tensor quantization written by the converter (mlx-lm layout); None = plain weights.
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        _refuse_unsupported(config)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except (TypeError, AttributeError) as e:  # e.g. "num_hidden_layers": "43"
            raise ConfigError(f"a config value has the wrong type ({e}).") from e

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist: a model directory needs its config.json.")
        config = load_json(path)  # its errors name the file already
        try:
            return cls.from_dict(config)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def __post_init__(self):
        if self.compress_ratios is None:
            raise ConfigError(
                "config.json has no `compress_ratios`: the per-layer attention schedule cannot be "
                "guessed (library defaults disagree with the released checkpoints)."
            )
        need = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) < need:
            raise ConfigError(
                f"`compress_ratios` has {len(self.compress_ratios)} entries but {need} are needed "
                f"({self.num_hidden_layers} layers + {self.num_nextn_predict_layers} MTP)."
            )
        for i, r in enumerate(self.compress_ratios[:need]):
            if r not in _RATIO_KIND:
                raise ConfigError(
                    f"`compress_ratios[{i}]` is {r}: only 0 (sliding window), 4 (CSA) and "
                    "128 (HCA) are supported."
                )
        checks = [
            (self.num_key_value_heads == 1, "one shared KV head (`num_key_value_heads` = 1)"),
            (self.n_shared_experts == 1, "exactly one shared expert (`n_shared_experts` = 1)"),
            (self.scoring_func == "sqrtsoftplus", "`scoring_func` = 'sqrtsoftplus'"),
            (self.hidden_act == "silu", "`hidden_act` = 'silu'"),
            (not self.tie_word_embeddings, "separate embedding and head (`tie_word_embeddings` false)"),
            (0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0,
             "an even `qk_rope_head_dim` smaller than `head_dim`"),
            (self.index_head_dim > self.qk_rope_head_dim, "`index_head_dim` larger than the rope dims"),
            (self.num_attention_heads % self.o_groups == 0, "`num_attention_heads` divisible by `o_groups`"),
            (self.num_experts_per_tok <= self.n_routed_experts, "`num_experts_per_tok` <= `n_routed_experts`"),
            (self.sliding_window >= 1, "a positive `sliding_window`"),
        ]
        for ok, what in checks:
            if not ok:
                raise ConfigError(f"This runtime needs {what}; the config does not have it.")
        rs = self.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type", "yarn")) != "yarn":
            raise ConfigError(f"`rope_scaling` type {rs.get('type')!r} is not supported (only YaRN).")

    # ----- schedule ---------------------------------------------------------------------------

    def compress_ratio(self, layer: int) -> int:
        """Ratio of trunk layer `layer`, or of MTP block k when `layer` = num_hidden_layers + k."""
        return self.compress_ratios[layer]

    def attention_kind(self, layer: int) -> str:
        return _RATIO_KIND[self.compress_ratio(layer)]

    def is_hash_layer(self, layer: int) -> bool:
        # MTP blocks have ids >= num_hidden_layers and are never hash-routed.
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def layer_kinds(self) -> list[str]:
        return [self.attention_kind(i) for i in range(self.num_hidden_layers)]

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    # ----- rope -------------------------------------------------------------------------------

    def rope_inv_freq(self, layer: int) -> list[float]:
        """Angular frequency θ_i per rotary pair for this layer (spec §1.3)."""
        r = self.qk_rope_head_dim
        if self.compress_ratio(layer) == 0:
            return [self.rope_theta ** (-2 * i / r) for i in range(r // 2)]
        return yarn_inv_freq(r, self.compress_rope_theta, self.rope_scaling)

    # ----- inventory --------------------------------------------------------------------------

    def tensors(self, include_mtp: bool = True) -> Iterator[tuple[str, tuple[int, ...], str]]:
        """(official name, logical shape, role) of every tensor of the release, spec §4.3.

        Shapes are logical (FP4 experts unpacked, no scale tensors). Roles: `expert`, `fp8`
        (block-scaled FP8 linears), `linear` (bf16 linears), `embed`, `head`, `norm`, `fp32`
        (mHC, sinks, ape, router bias), `index` (tid2eid).
        """
        D, V = self.hidden_size, self.vocab_size
        yield "embed.weight", (V, D), "embed"
        for i in range(self.num_hidden_layers):
            yield from self._block_tensors(f"layers.{i}.", i)
        yield "norm.weight", (D,), "norm"
        yield "head.weight", (V, D), "head"
        yield from self._hc_head("")
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                p = f"mtp.{k}."
                yield from self._block_tensors(p, self.num_hidden_layers + k)
                yield p + "e_proj.weight", (D, D), "fp8"
                yield p + "h_proj.weight", (D, D), "fp8"
                for n in ("enorm", "hnorm", "norm"):
                    yield p + f"{n}.weight", (D,), "norm"
                yield from self._hc_head(p)

    def _hc_head(self, p: str):
        N, D = self.hc_mult, self.hidden_size
        yield p + "hc_head_fn", (N, N * D), "fp32"
        yield p + "hc_head_base", (N,), "fp32"
        yield p + "hc_head_scale", (1,), "fp32"

    def _block_tensors(self, p: str, layer: int):
        D, N, H, c = self.hidden_size, self.hc_mult, self.num_attention_heads, self.head_dim
        g, dg, dc, I, E = self.o_groups, self.o_lora_rank, self.q_lora_rank, self.moe_intermediate_size, self.n_routed_experts
        for site in ("attn", "ffn"):
            yield p + f"hc_{site}_fn", ((N + 2) * N, N * D), "fp32"
            yield p + f"hc_{site}_base", ((N + 2) * N,), "fp32"
            yield p + f"hc_{site}_scale", (3,), "fp32"
        yield p + "attn_norm.weight", (D,), "norm"
        yield p + "ffn_norm.weight", (D,), "norm"
        a = p + "attn."
        yield a + "attn_sink", (H,), "fp32"
        yield a + "wq_a.weight", (dc, D), "fp8"
        yield a + "q_norm.weight", (dc,), "norm"
        yield a + "wq_b.weight", (H * c, dc), "fp8"
        yield a + "wkv.weight", (c, D), "fp8"
        yield a + "kv_norm.weight", (c,), "norm"
        yield a + "wo_a.weight", (g * dg, H * c // g), "fp8"
        yield a + "wo_b.weight", (D, g * dg), "fp8"
        m = self.compress_ratio(layer)
        if m:
            yield from self._compressor(a + "compressor.", m, c)
        if m == 4:
            yield from self._compressor(a + "indexer.compressor.", m, self.index_head_dim)
            yield a + "indexer.wq_b.weight", (self.index_n_heads * self.index_head_dim, dc), "fp8"
            yield a + "indexer.weights_proj.weight", (self.index_n_heads, D), "linear"
        f = p + "ffn."
        yield f + "gate.weight", (E, D), "linear"
        if self.is_hash_layer(layer):
            yield f + "gate.tid2eid", (self.vocab_size, self.num_experts_per_tok), "index"
        else:
            yield f + "gate.bias", (E,), "fp32"
        for e in range(E):
            yield f + f"experts.{e}.w1.weight", (I, D), "expert"
            yield f + f"experts.{e}.w2.weight", (D, I), "expert"
            yield f + f"experts.{e}.w3.weight", (I, D), "expert"
        yield f + "shared_experts.w1.weight", (I, D), "fp8"
        yield f + "shared_experts.w2.weight", (D, I), "fp8"
        yield f + "shared_experts.w3.weight", (I, D), "fp8"

    def _compressor(self, p: str, m: int, width: int):
        k = 2 if m == 4 else 1  # CSA windows overlap: every row carries two halves
        yield p + "ape", (m, k * width), "fp32"
        yield p + "wkv.weight", (k * width, self.hidden_size), "linear"
        yield p + "wgate.weight", (k * width, self.hidden_size), "linear"
        yield p + "norm.weight", (width,), "norm"

    def parameter_count(self, include_mtp: bool = True) -> int:
        # tid2eid is a routing table, not a learned parameter; the published totals leave it out.
        return sum(math.prod(s) for _, s, role in self.tensors(include_mtp) if role != "index")

    def active_parameter_count(self) -> int:
        """Parameters touched per token by the trunk (all of embed counted, spec §1.4)."""
        total = self.parameter_count(include_mtp=False)
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        idle = self.n_routed_experts - self.num_experts_per_tok
        return total - self.num_hidden_layers * idle * expert


def yarn_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None) -> list[float]:
    """YaRN-blended frequencies (no magnitude scaling; V4 keeps cos/sin unscaled)."""
    theta = [base ** (-2 * i / dim) for i in range(dim // 2)]
    if not scaling:
        return theta
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

    def corr(beta: float) -> float:
        return dim * math.log(original / (2 * math.pi * beta)) / (2 * math.log(base))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    span = max(high - low, 1e-3)  # a zero-width ramp would divide by zero
    out = []
    for i, t in enumerate(theta):
        ramp = min(max((i - low) / span, 0.0), 1.0)
        out.append(t * (1 - ramp) + (t / factor) * ramp)
    return out


def _refuse_unsupported(config: dict[str, Any]) -> None:
    mt = config.get("model_type")
    if mt == "deepseek_v41" or "text_config" in config or "kv_source_layer_ids" in config:
        raise ConfigError(
            "This is a DeepSeek-V4.1 config: V4.1 is a different architecture (Engram memory, "
            "CSA2 shared compressors, two-level indexer) that mlx-dsv4 does not support."
        )
    if mt != "deepseek_v4":
        raise ConfigError(f"model_type {mt!r} is not supported: mlx-dsv4 runs DeepSeek-V4 checkpoints "
                          "(model_type 'deepseek_v4').")
