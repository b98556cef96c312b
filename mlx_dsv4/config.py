"""Model configuration: `ModelArgs` read from an official DeepSeek-V4 or V4.1 `config.json`.

Owns the hyper-parameters, the per-layer schedule (sliding / CSA / HCA attention, hash / top-k
MoE; for V4.1 which layers own the shared pools and indexers, spec §1.6), the two RoPE frequency
tables, and the logical tensor inventory of spec §4.3 that the converter, the planner and the
parameter counts are derived from. A V4.1 config nests its text model under `text_config`;
`from_dict` flattens it and keeps the rest (`vision_config`, `quantization_config`) in `extra`.
No MLX import: everything here is plain Python so the planner and the converter's dry run work
without touching a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SLIDING, CSA, HCA = "sliding", "csa", "hca"
# V4.1: a compressed layer (ratio 1 or 2) whose keys are the window plus the indexer's top-k of
# a pool that one layer owns and later layers share (spec §1.6).
SHARED = "shared"
_RATIO_KIND = {0: SLIDING, 4: CSA, 128: HCA}
V4, V41 = "deepseek_v4", "deepseek_v41"


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


# V4.1 compressor projections: the reference runs them in fp32, and they are small (7 matrices
# of 512 x D), so they are stored fp32 rather than promoted on every call.
KEEP_FLOAT32_V41 = (".compressor.wkv.weight", ".compressor.wgate.weight")


def keep_float32(name: str, v41: bool = False) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if v41 and name.endswith(KEEP_FLOAT32_V41):
        return True
    return leaf.startswith("hc_") or any(("." + name).endswith(k) for k in KEEP_FLOAT32[1:])


def list_names(names: list[str], most: int = 10) -> str:
    """`a, b, c and 7 more`: tensor names in an error message."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# The released configs ship with the package so the planner can answer before any download.
# v41-flash.json is DeepSeek-V4.1-Flash's config.json (the -1017 release shares it), nesting
# included, as transcribed in public test suites (two independent copies agree).
RELEASED = {"flash": "deepseek-ai/DeepSeek-V4-Flash", "pro": "deepseek-ai/DeepSeek-V4-Pro",
            "v41-flash": "deepseek-ai/DeepSeek-V4.1-Flash"}


def released_config(name: str) -> dict[str, Any] | None:
    """The config.json of a release named `flash`, `pro`, `v41-flash` or by its repo id (a
    `-0731` or `-1017` refresh shares its base's shapes); None for anything else."""
    text = str(name).lower()
    if "/" in text and not text.startswith("deepseek-ai/"):
        return None
    tail = text.split("/")[-1]
    if tail.startswith(("deepseek-v4.1-", "v4.1-", "v41-")):
        key = "v41-" + tail.split("-")[1 if not tail.startswith("deepseek") else 2]
    else:
        key = tail.removeprefix("deepseek-v4-").split("-")[0]
    if key not in RELEASED:
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
    # V4.1 (spec §1.6): layers owning the shared compressed pools and the indexers, the
    # two-level candidate selection, and the Engram n-gram memory. Empty for V4.
    kv_source_layer_ids: list[int] = field(default_factory=list)
    index_source_layer_ids: list[int] = field(default_factory=list)
    candidate_source_layer_id: int = -1
    candidate_topk_blocks: int = 0
    candidate_block_size: int = 1
    engram_layer_ids: list[int] = field(default_factory=list)
    engram_num_embeddings: list[int] = field(default_factory=list)
    engram_max_ngram_size: int = 0
    engram_vocab_size: int = 0
    engram_n_heads: int = 0
    engram_head_dim: int = 0
    engram_pad_token_id: int = 0
    engram_compressed_vocab_size: int = 0
    # MLX per-tensor quantization written by the converter (mlx-lm layout); None = plain weights.
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        _refuse_unsupported(config)
        if config.get("model_type") == V41:
            config = _flatten_v41(config)
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
        if self.is_v41:
            _check_v41(self)
        for i, r in enumerate(self.compress_ratios[:need]):
            if self.is_v41 and r in (0, 1, 2):
                continue
            if r not in _RATIO_KIND or self.is_v41:
                raise ConfigError(
                    f"`compress_ratios[{i}]` is {r}: only 0 (sliding window), 4 (CSA) and "
                    "128 (HCA) are supported." if not self.is_v41 else
                    f"`compress_ratios[{i}]` is {r}: V4.1 layers have ratio 0 (sliding window), "
                    "1 or 2 (shared compressed pools)."
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

    @property
    def is_v41(self) -> bool:
        return self.model_type == V41

    def compress_ratio(self, layer: int) -> int:
        """Ratio of trunk layer `layer`, or of MTP block k when `layer` = num_hidden_layers + k."""
        return self.compress_ratios[layer]

    def attention_kind(self, layer: int) -> str:
        if self.is_v41:
            return SHARED if self.compress_ratio(layer) else SLIDING
        return _RATIO_KIND[self.compress_ratio(layer)]

    # V4.1 roles (spec §1.6). A compressed layer reads the pool of the latest kv source at or
    # before it and the top-k of the latest index source at or before it; an index source scores
    # the index keys of its pool's owner; index sources after the candidate source score only
    # the candidate blocks it picked.

    def owns_pool(self, layer: int) -> bool:
        """Whether `layer` computes and stores compressed entries (V4: every CSA/HCA layer)."""
        if not self.is_v41:
            return self.compress_ratio(layer) > 0
        return layer in self.kv_source_layer_ids

    def pool_source(self, layer: int) -> int | None:
        """The layer whose pool `layer` attends over (itself for V4), None for a sliding layer."""
        if not self.compress_ratio(layer):
            return None
        if not self.is_v41:
            return layer
        return max((s for s in self.kv_source_layer_ids if s <= layer), default=None)

    def index_source(self, layer: int) -> int | None:
        """The layer whose top-k `layer` uses (V4.1), None when it attends to every entry."""
        if not self.is_v41 or not self.compress_ratio(layer):
            return None
        return max((s for s in self.index_source_layer_ids if s <= layer), default=None)

    def uses_candidates(self, layer: int) -> bool:
        """Whether index source `layer` scores only the candidate source's blocks."""
        c = self.candidate_source_layer_id
        return self.is_v41 and 0 <= c < layer and layer in self.index_source_layer_ids

    def is_engram_layer(self, layer: int) -> bool:
        return layer in self.engram_layer_ids

    def pipeline_cuts(self) -> set[int]:
        """Layers a pipeline stage may start at: V4.1 layers read pools, top-k and candidate
        blocks of earlier layers within one forward, so a cut must not separate a layer from
        any of those (for V4 any layer)."""
        L = self.num_hidden_layers
        if not self.is_v41:
            return set(range(1, L))
        cuts = set()
        for c in range(1, L):
            reads = [(self.pool_source(i), self.index_source(i)) for i in range(c, L)]
            candidates = any(self.uses_candidates(i) for i in range(c, L))
            if all(s is None or s >= c for pair in reads for s in pair) and not (
                    candidates and self.candidate_source_layer_id < c):
                cuts.add(c)
        return cuts

    def first_layers(self, n: int) -> "ModelArgs":
        """This config cut to its first `n` layers (a pipeline's rank 0), no MTP."""
        keep = [i for i in self.engram_layer_ids if i < n]
        c = self.candidate_source_layer_id
        return dataclasses.replace(
            self, num_hidden_layers=n, num_nextn_predict_layers=0,
            kv_source_layer_ids=[i for i in self.kv_source_layer_ids if i < n],
            index_source_layer_ids=[i for i in self.index_source_layer_ids if i < n],
            candidate_source_layer_id=c if c < n else -1, engram_layer_ids=keep,
            engram_num_embeddings=[r for i, r in zip(self.engram_layer_ids, self.engram_num_embeddings)
                                   if i < n])

    def is_hash_layer(self, layer: int) -> bool:
        # MTP blocks have ids >= num_hidden_layers and are never hash-routed; V4.1 has none.
        return not self.is_v41 and layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def fp8_block(self) -> int:
        """Side of the release's square FP8 weight blocks: 128 for V4, 32 for V4.1."""
        q = self.extra.get("quantization_config") or {}
        return int((q.get("weight_block_size") or [128])[0])

    @property
    def engram_hash_columns(self) -> int:
        """Rows an Engram layer reads per token: one per (n-gram size, head)."""
        return max(self.engram_max_ngram_size - 1, 0) * self.engram_n_heads

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
        (mHC, sinks, ape, router bias), `index` (tid2eid), `engram` (V4.1's n-gram tables: FP8
        rows with one E8M0 scale per 32 values, read from disk, never loaded).
        """
        D, V = self.hidden_size, self.vocab_size
        if self.is_v41:
            yield from self._v41_tensors()
            return
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

    def _shared_block_tensors(self, p: str):
        """What a V4 and a V4.1 block both hold: the mHC sites, the norms and the attention's
        projections (official names, shapes, dtype class)."""
        D, N, H, c = self.hidden_size, self.hc_mult, self.num_attention_heads, self.head_dim
        g, dg, dc = self.o_groups, self.o_lora_rank, self.q_lora_rank
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

    def _block_tensors(self, p: str, layer: int):
        D, c, dc, E = self.hidden_size, self.head_dim, self.q_lora_rank, self.n_routed_experts
        yield from self._shared_block_tensors(p)
        a = p + "attn."
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
        yield from self._expert_tensors(f)

    def _expert_tensors(self, f: str):
        """A block's routed experts (FP4) and shared expert (FP8), under `f` ("layers.i.ffn.")."""
        D, I = self.hidden_size, self.moe_intermediate_size
        for e in range(self.n_routed_experts):
            yield f + f"experts.{e}.w1.weight", (I, D), "expert"
            yield f + f"experts.{e}.w2.weight", (D, I), "expert"
            yield f + f"experts.{e}.w3.weight", (I, D), "expert"
        yield f + "shared_experts.w1.weight", (I, D), "fp8"
        yield f + "shared_experts.w2.weight", (D, I), "fp8"
        yield f + "shared_experts.w3.weight", (I, D), "fp8"

    def _v41_tensors(self):
        D, V, N = self.hidden_size, self.vocab_size, self.hc_mult
        c, dc, E = self.head_dim, self.q_lora_rank, self.n_routed_experts
        yield "embed.weight", (V, D), "embed"
        for i in range(self.num_hidden_layers):
            p = f"layers.{i}."
            yield from self._shared_block_tensors(p)
            a = p + "attn."
            if self.owns_pool(i):
                yield a + "compressor.wkv.weight", (c, D), "linear"
                if self.compress_ratio(i) > 1:  # a ratio-1 entry is one token: nothing to pool
                    yield a + "compressor.wgate.weight", (c, D), "linear"
                yield a + "compressor.norm.weight", (c,), "norm"
            if i in self.index_source_layer_ids:
                yield a + "indexer.wq_b.weight", (self.index_n_heads * self.index_head_dim, dc), "fp8"
                yield a + "indexer.weights_proj.weight", (self.index_n_heads, D), "linear"
                if self.owns_pool(i):  # index keys come from the owner's compressed latent
                    yield a + "indexer.wk.weight", (self.index_head_dim, c), "linear"
                    yield a + "indexer.k_norm.weight", (self.index_head_dim,), "norm"
            f = p + "ffn."
            yield f + "gate.weight", (E, D), "linear"
            yield f + "gate.bias", (E,), "fp32"
            yield from self._expert_tensors(f)
            if self.is_engram_layer(i):
                e = p + "engram."
                rows = self.engram_num_embeddings[self.engram_layer_ids.index(i)]
                hd = self.engram_head_dim
                yield e + "embed.weight", (rows, hd), "engram"
                yield e + "wkv.weight", ((N + 1) * D, self.engram_hash_columns * hd), "fp8"
                yield e + "q_weight", (N, D), "norm"
                yield e + "k_weight", (N, D), "norm"
        yield "norm.weight", (D,), "norm"
        yield "head.weight", (V, D), "head"

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
        """Parameters touched per token by the trunk (all of embed counted, spec §1.4); of the
        Engram tables only the rows a token reads."""
        total = self.parameter_count(include_mtp=False)
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        idle = self.n_routed_experts - self.num_experts_per_tok
        engram = sum(self.engram_num_embeddings) - len(self.engram_layer_ids) * self.engram_hash_columns
        return total - self.num_hidden_layers * idle * expert - engram * self.engram_head_dim


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
    if mt == V4 and ("text_config" in config or "kv_source_layer_ids" in config):
        raise ConfigError("A config with model_type 'deepseek_v4' and V4.1 keys (`text_config` or "
                          "`kv_source_layer_ids`) is neither V4 nor V4.1; set model_type "
                          "'deepseek_v41' if it is a V4.1 checkpoint.")
    if mt is None and "text_config" in config:
        raise ConfigError("config.json nests a `text_config` but names no model_type; a "
                          "DeepSeek-V4.1 config says model_type 'deepseek_v41'.")
    if mt not in (V4, V41):
        raise ConfigError(f"model_type {mt!r} is not supported: mlx-dsv4 runs DeepSeek-V4 and V4.1 "
                          "checkpoints (model_type 'deepseek_v4' or 'deepseek_v41').")


# Top-level keys of a V4.1 config.json that describe the text model (the rest stays in `extra`).
_V41_TOP = ("bos_token_id", "eos_token_id", "tie_word_embeddings", "quantization")


def _flatten_v41(config: dict[str, Any]) -> dict[str, Any]:
    """One flat dict from V4.1's nesting: `text_config` first, then the top level's token ids;
    `vision_config`, `quantization_config` and the rest stay as extra keys. A flat V4.1 config
    (no `text_config`) passes as it is."""
    text = config.get("text_config")
    if text is None:
        flat = dict(config)
    elif not isinstance(text, dict):
        raise ConfigError("`text_config` is not an object.")
    else:
        flat = {k: v for k, v in config.items() if k != "text_config"}
        flat.update({k: v for k, v in text.items() if k != "model_type"})
        flat.update({k: config[k] for k in _V41_TOP if k in config})
        flat["model_type"] = V41
    # The checkpoint's next-n layers are DSpark draft stages, not MTP blocks: no MTP to run.
    if "dspark_block_size" in flat:
        flat.setdefault("dspark_num_nextn_predict_layers", flat.get("num_nextn_predict_layers", 0))
        flat["num_nextn_predict_layers"] = 0
    flat.setdefault("num_hash_layers", 0)
    return flat


def _check_v41(a: ModelArgs) -> None:
    """Refuse a V4.1 schedule this runtime cannot run, naming the layer."""
    L = a.num_hidden_layers
    ratio = a.compress_ratios
    sources, index = a.kv_source_layer_ids, a.index_source_layer_ids

    def bad(what: str):
        raise ConfigError(f"This V4.1 config cannot run: {what}.")

    for name, ids in (("kv_source_layer_ids", sources), ("index_source_layer_ids", index),
                      ("engram_layer_ids", a.engram_layer_ids)):
        if not isinstance(ids, list) or any(not isinstance(i, int) or not 0 <= i < L for i in ids):
            bad(f"`{name}` must list layers 0..{L - 1}")
    for i in range(L):
        if not ratio[i]:
            continue
        s = a.pool_source(i)
        if s is None or ratio[s] != ratio[i]:
            bad(f"layer {i} (ratio {ratio[i]}) has no kv source layer of the same ratio at or "
                "before it to read compressed entries from")
        x = a.index_source(i)
        if x is None or a.pool_source(x) != s:
            bad(f"layer {i} has no index source layer at or before it that reads its pool")
    for s in sources:
        if not ratio[s]:
            bad(f"kv source layer {s} has ratio 0: it has nothing to compress")
        if s not in index:
            bad(f"kv source layer {s} is not an index source, so no layer would publish its index keys")
    c = a.candidate_source_layer_id
    if c >= 0:
        if c not in index:
            bad(f"the candidate source layer {c} is not an index source")
        if a.candidate_topk_blocks < 1 or a.candidate_block_size < 1:
            bad("`candidate_topk_blocks` and `candidate_block_size` must be positive")
        if a.candidate_topk_blocks * a.candidate_block_size < a.index_topk:
            bad("the candidate blocks (`candidate_topk_blocks` x `candidate_block_size`) must hold "
                "at least `index_topk` entries")
        for i in index:
            if i > c and a.pool_source(i) != a.pool_source(c):
                bad(f"index layer {i} scores candidates picked over another layer's pool")
    if a.engram_layer_ids:
        if len(a.engram_num_embeddings) != len(a.engram_layer_ids):
            bad("`engram_num_embeddings` needs one table size per Engram layer")
        if min(a.engram_max_ngram_size, a.engram_n_heads, a.engram_head_dim,
               a.engram_compressed_vocab_size, a.engram_vocab_size) < 1 or a.engram_max_ngram_size < 2:
            bad("the Engram sizes (n-gram size >= 2, heads, head dim, vocabularies) must be positive")
        if a.engram_head_dim % 32:
            bad(f"`engram_head_dim` {a.engram_head_dim} is not a multiple of the FP8 scale group 32")
