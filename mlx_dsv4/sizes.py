"""What each part of a model costs in bytes, before anything is allocated: weights per recipe
(from a release's tensor inventory or a converted folder's shard headers), the routed experts'
share, decode state per token (from the cache classes themselves), the activations of a forward
(an estimate from its largest intermediates), this machine's budget; sizes read and written as
text. The planner (`plan.py`) adds these up; prefill pacing reads the activation estimate.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import CSA, HCA, SHARED, ModelArgs

GiB = 1 << 30


class PlanError(ValueError):
    pass


def recipes() -> list[str]:
    """What `recipe` may name: the release as shipped, then every conversion recipe."""
    from .convert.plan import RECIPES  # the convert package imports MLX; plan.py does not

    return ["official", *RECIPES]


def default_recipe() -> str:
    from .convert.plan import DEFAULT_RECIPE

    return DEFAULT_RECIPE


# Bytes per logical parameter of the release as shipped (spec §5.2): FP4 experts with one E8M0
# byte per 32, FP8 with one per 128x128 block, bf16/fp32 elsewhere. Converted recipes are counted
# by the converter's own plan instead (`convert.plan.recipe_bytes`), byte for byte.
OFFICIAL_BYTES = {"expert": 4.25 / 8, "fp8": 1 + 1 / 16384, "embed": 2, "head": 2, "linear": 2,
                   "norm": 2, "fp32": 4, "index": 8, "engram": 0}  # Engram: on disk, not in memory


def format_bytes(n: int, digits: int = 2) -> str:
    """GiB, or MiB below one GiB (tiny test models)."""
    return f"{n / GiB:,.{digits}f} GiB" if n >= GiB else f"{n / 2**20:,.{digits}f} MiB"


def weight_bytes(args: ModelArgs, recipe: str, include_mtp: bool = True) -> int:
    """Weight bytes of `recipe` for this model: for a conversion recipe, exactly the tensor bytes
    `dsv4 convert` writes (the shards' payload)."""
    if recipe not in recipes():
        raise PlanError(f"Unknown recipe {recipe!r}; choose one of {', '.join(recipes())}.")
    if recipe != "official":
        from .convert.plan import recipe_bytes

        return recipe_bytes(args, recipe, include_mtp)
    fp8 = 1 + 1 / args.fp8_block**2  # one E8M0 scale per square block (V4: 128, V4.1: 32)
    return int(sum(math.prod(shape) * (fp8 if role == "fp8" else OFFICIAL_BYTES[role])
                   for _, shape, role in args.tensors(include_mtp)))


def engram_disk_bytes(args: ModelArgs) -> tuple[int, int]:
    """(bytes of V4.1's Engram table files on disk, table bytes one token reads): FP8 rows of
    `engram_head_dim` values with one E8M0 scale per 32, as converted (model/engram.py)."""
    row = args.engram_head_dim + args.engram_head_dim // 32
    return (sum(args.engram_num_embeddings) * row,
            len(args.engram_layer_ids) * args.engram_hash_columns * row)


def weight_bytes_from_dir(path: Path) -> int:
    """Sum of the tensor payloads of every shard, read from the safetensors headers only."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0]
               for f in sorted(path.glob("*.safetensors")) for v in shard_header(f).values())


def shard_header(f: Path) -> dict:
    with open(f, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > f.stat().st_size:
                raise ValueError(f"a {n:,}-byte header in a {f.stat().st_size:,}-byte file")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for v in header.values():
                v["data_offsets"][1] - v["data_offsets"][0]  # noqa: B018 (checks each entry)
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"{f} is truncated or not a safetensors file ({e}).") from e
    return header


@dataclass
class ExpertBytes:
    """Routed-expert bytes of a model: all of them, one expert of one layer (w1, w2, w3 with
    their scales), and what a decoded token's picks weigh (k experts in each trunk layer)."""
    total: int
    each: int
    per_token: int


def expert_bytes(args: ModelArgs, recipe: str) -> ExpertBytes:
    """Routed-expert bytes of `recipe` for this model (the converter's own arithmetic)."""
    from .convert.plan import _bytes_by_tensor  # the per-tensor form of recipe_bytes

    total = trunk = 0
    for name, n, role in _bytes_by_tensor(args, recipe, True):
        if role == "expert":
            total += n
            trunk += n if name.startswith("layers.") else 0
    return _expert_split(args, round(total), round(trunk))


def expert_bytes_from_dir(path: Path, args: ModelArgs) -> ExpertBytes:
    """Routed-expert bytes of a converted directory, from its shard headers."""
    total = trunk = 0
    for f in sorted(path.glob("*.safetensors")):
        for name, v in shard_header(f).items():
            if re.match(r"^(layers|mtp)\.\d+\.ffn\.experts\.", name):
                n = v["data_offsets"][1] - v["data_offsets"][0]
                total += n
                trunk += n if name.startswith("layers.") else 0
    return _expert_split(args, total, trunk)


def _expert_split(args: ModelArgs, total: int, trunk: int) -> ExpertBytes:
    L, E, k = args.num_hidden_layers, args.n_routed_experts, args.num_experts_per_tok
    each = trunk // (L * E) if L and E else 0
    return ExpertBytes(total, each, each * k * L)


def state_bytes(args: ModelArgs, context: int, kv_bits: int | None, dtype_bytes: int = 2):
    """(KV pool bytes at `context`, fixed per-sequence bytes) from the real cache classes."""
    import mlx.core as mx

    from .model.cache import make_cache

    dtype = {2: mx.bfloat16, 4: mx.float32}[dtype_bytes]
    pools = fixed = 0
    # The MTP block's window ring too: speculative decoding keeps one beside the trunk's.
    caches = make_cache(args, dtype=dtype, max_tokens=max(context, 1), kv_bits=kv_bits)
    caches += make_cache(args, dtype=dtype, mtp=True)
    for c in caches:
        for name in ("kv_pool", "index_pool"):
            part = getattr(c, name)
            if part is not None:
                pools += part.nbytes
        fixed += c.nbytes
    return pools, fixed - pools


# The terms of `activation_bytes` miss transients MLX keeps alive within one evaluation: a 256-token prefill
# chunk of two real Flash layers (benchmarks/flash_layers.py, bf16, CPU) peaked 266 MiB above its
# weights against 217 MiB estimated, so the estimate is scaled up by that measured ratio.
ACTIVATION_MARGIN = 1.25


def activation_bytes(args: ModelArgs, tokens: int, context: int, kv_bits: int | None = None, *,
                     paced: bool = False) -> int:
    """Peak transient bytes of one forward over `tokens` new tokens at `context` (estimate).

    Terms: the residual streams and their fp32 mHC copies; queries in bf16 and fp32; per query
    block (attention.QUERY_BLOCK) the window scores, the gathered CSA keys, the indexer scores
    and the HCA scores; one piece of MoE rows; the last-position logits. `paced`: the working set
    that prefill evaluation is paced to; the plan adds ACTIVATION_MARGIN over it for the work
    MLX has queued when it pauses.
    """
    from .model.attention import INDEX_SCORE_BYTES, QUERY_BLOCK, SPARSE_QUERY_BLOCK
    from .model.model import PIECE_ROWS

    S, D, N, H, c = tokens, args.hidden_size, args.hc_mult, args.num_attention_heads, args.head_dim
    Bq, W = min(S, QUERY_BLOCK), args.sliding_window
    kinds = set(args.layer_kinds)
    streams = S * N * D * (2 * 2 + 4 * 2)
    # V4.1's shared pools select like CSA, over the densest pool (ratio 1: every token an entry).
    csa = 4 if CSA in kinds else min((r for r in args.compress_ratios[: args.num_hidden_layers] if r),
                                    default=0) if SHARED in kinds else 0
    queries = S * H * c * 2 + Bq * H * c * 4 + S * args.q_lora_rank * 4  # fp32 per block
    # Each query scores its own W window keys, gathered per query block in fp32.
    window = 2 * H * Bq * W * 4 + Bq * W * c * 4 + (W + S) * c * 4
    block = window
    if csa:
        n = context // csa
        if n <= args.index_topk:  # dense: every entry, shared by the block's queries
            block += n * c * 4 + 2 * H * Bq * n * 4
        else:  # the indexer's scores and each query's top-k entries, gathered, in smaller blocks
            k, Bs = args.index_topk, min(S, SPARSE_QUERY_BLOCK)
            gather = Bs * k * c * (4 + 2)
            index = min(INDEX_SCORE_BYTES, Bs * args.index_n_heads * n * 4) + 2 * Bs * n * 4
            index += Bs * n * 8 if args.is_v41 else 0  # v41.top_k's ranking keys (uint64)
            block += gather + 2 * H * Bs * k * 4 + index
    if HCA in kinds:
        n = context // 128
        block += 2 * H * Bq * n * 4 + n * c * 4
    # Routed rows run PIECE_ROWS at a time (copy, gate/up/h, output) into an fp32 sum.
    rows = min(S * args.num_experts_per_tok, PIECE_ROWS)
    moe = rows * (D * 2 + 3 * args.moe_intermediate_size * 4 + D * 4) + 2 * S * D * 4
    logits = args.vocab_size * 4 * 2
    # Attention and the MoE run one after the other, and evaluation is paced to this estimate
    # (generation.pacing), so only one of them is live beside the streams.
    raw = streams + max(queries + block, moe) + logits
    return raw if paced else int(ACTIVATION_MARGIN * raw)


def machine_budget() -> tuple[int, str]:
    """Bytes this machine can give the model, and where the figure comes from."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if platform.system() == "Darwin":
        # Raising the wired limit (generate does) lets the GPU use RAM minus an OS reserve.
        return with_reserve(total), f"{total / GiB:.0f} GiB unified memory less an OS reserve"
    return total, f"{total / GiB:.0f} GiB physical memory"


def with_reserve(total: int) -> int:
    return total - max(8 * GiB, total // 10)


_PREFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str, *, decimal: bool = False) -> int:
    """'256GB', '192G', '4GiB', '500MB', '5e9' -> bytes. KiB/MiB/GiB/TiB are binary; KB/MB/GB/TB
    (and K/M/G/T) are binary too unless `decimal`: a '256GB' Mac has 256 GiB, a '5GB' file 5e9."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:E[0-9]+)?)\s*([KMGT]?)(I?)(B?)\s*", str(text).upper())
    if not m or (m.group(3) and not (m.group(2) and m.group(4))):
        raise ValueError(f"{text!r} is not a size like 256GB, 500MB or 4GiB.")
    base = 1000 if decimal and not m.group(3) else 1024
    return int(float(m.group(1)) * base ** _PREFIX[m.group(2)])
