"""The conversion plan: checkpoint headers in, a deterministic list of jobs and output shards out.

Only headers are read (the index's weight map and `safe_open` names, dtypes and shapes; never
tensor data), so planning the 160 GB Flash release takes seconds and `--dry-run` reads no weights.
`make_plan` is pure: for every official tensor it decides what the recipe does with it, which MLX
parameters it becomes, and where their bytes land in the output shards. It also refuses what a
header can reveal: tensors the inventory does not know, missing ones, FP8/FP4 weights whose
scales do not fit, wrong dtypes. The arithmetic lives in `quant.py`, the files in `shards.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelArgs, keep_float32, load_json
from ..config import list_names as _names

INDEX = "model.safetensors.index.json"
ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4,
            "I32": 4, "U32": 4, "I64": 8}
FP8_BLOCK, FP4_GROUP = 128, 32
_FLOATS = ("BF16", "F16", "F32")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


DSPARK_KEY = "dspark_block_size"  # marks a checkpoint that carries DSpark draft stages


class ConvertError(ValueError):
    """A checkpoint or output directory the converter refuses, with a sentence saying why."""


@dataclass(frozen=True)
class Header:
    """One source tensor as its shard's header describes it."""

    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class Source:
    """What planning needs from a checkpoint: its config and every tensor header."""

    config: dict
    tensors: dict[str, Header]


@dataclass(frozen=True)
class Quant:
    mode: str
    group_size: int
    bits: int

    def entry(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


# Routed experts ship as FP4 with one E8M0 scale per 32: that is MLX mxfp4 bit for bit (spec §4.5).
EXPERTS = Quant("mxfp4", 32, 4)
# FP8 linears with their 128x128 block scales expanded to one per 32: MLX mxfp8, also exact.
MXFP8 = Quant("mxfp8", 32, 8)
A8, A4 = Quant("affine", 64, 8), Quant("affine", 64, 4)
# The attention's three largest matrices: about three quarters of the FP8 bytes of a Flash layer.
BIG_ATTENTION = r"\.attn\.(wq_b|wo_a|wo_b)$"


@dataclass(frozen=True)
class Recipe:
    """How every quantizable tensor is stored; a tensor no field names is kept as shipped.

    `rules` are (regex, Quant) pairs tried in order against the module name (the official name
    without `.weight`; a layer's routed experts as one stacked module, `layers.3.ffn.experts.w2`);
    the first that `re.search`es wins. Otherwise the role decides: `fp8` for the FP8 linears
    (attention, shared expert, MTP projections), `experts` for the FP4 routed experts, `embed`
    and `head` (None keeps them bf16). A SwiGLU's w1 and w3 must share one Quant: the model fuses
    them into one matrix at load.
    """

    name: str
    summary: str
    fp8: Quant = MXFP8
    experts: Quant = EXPERTS
    embed: Quant | None = None
    head: Quant | None = None
    rules: tuple[tuple[str, Quant], ...] = ()

    def quant(self, module: str, role: str) -> Quant | None:
        for pattern, q in self.rules:
            if re.search(pattern, module):
                return q
        return {"fp8": self.fp8, "expert": self.experts, "embed": self.embed, "head": self.head}[role]


def _experts(name: str, bits: int, summary: str) -> Recipe:
    """`attn4` with the routed experts requantised from FP4 to `bits`-bit affine groups of 128
    (at about equal bytes, one more bit is worth far more than finer scales: 3-bit g128 beats
    2-bit g32), and the embedding 8-bit (memory, not bytes per token: 0.001 nats for 0.5 GiB).
    The MTP block's experts go to 2 bits in both: the runtime does not run MTP."""
    return Recipe(name, summary, experts=Quant("affine", 128, bits), embed=A8, head=A8,
                  rules=((r"^mtp\.\d+\.ffn\.experts\.", Quant("affine", 128, 2)), (BIG_ATTENTION, A4)))


RECIPES = {r.name: r for r in (
    # The default: 4 bits only where they save the most bytes per token for the least error
    # (benchmarks/quant_fidelity.py: 2.2-2.8x less KL than q4 for 8.7% more bytes per token).
    Recipe("attn4", "attention wq_b/wo_a/wo_b affine 4-bit g64, other FP8 linears mxfp8 (exact), "
           "experts mxfp4 as shipped, head 8-bit", head=A8, rules=((BIG_ATTENTION, A4),)),
    Recipe("q4", "experts mxfp4 as shipped, FP8 linears affine 4-bit g64, embed/head 8-bit",
           fp8=A4, embed=A8, head=A8),
    Recipe("native", "lossless: experts mxfp4, FP8 linears mxfp8, the rest as shipped"),
    Recipe("native-h8", "native with the head affine 8-bit g64", head=A8),
    Recipe("q8", "experts mxfp4 as shipped, FP8 linears affine 8-bit g64, embed/head 8-bit "
           "(larger than native and not exact: kept for existing conversions)",
           fp8=A8, embed=A8, head=A8),
    _experts("experts3", 3, "attn4 with routed experts affine 3-bit g128, embedding 8-bit"),
    _experts("experts2", 2, "attn4 with routed experts affine 2-bit g128, embedding 8-bit"),
)}
DEFAULT_RECIPE = "attn4"


@dataclass(frozen=True)
class Target:
    """One output tensor. Stacked experts have `pieces` = E, piece e at byte e * nbytes / E."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: int = 1

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class Job:
    """Turn source tensor `weight` (and its `scale`) into `targets`, in the order quant.run returns.

    Actions: `cast` (as shipped, or to the target dtype), `fp4` (expert bytes as mxfp4), `fp8_mx`
    (FP8 bytes as mxfp8, scales expanded), `fp8_affine` and `fp4_requant` (dequantise, quantize
    at `quant`) and `affine` (quantize a bf16 tensor).
    """

    action: str
    weight: str
    scale: str | None
    targets: tuple[str, ...]
    quant: Quant | None = None
    piece: int = 0
    block: int = FP8_BLOCK  # side of the source's square FP8 scale blocks (V4.1: 32)


@dataclass(frozen=True)
class EngramTable:
    """A V4.1 Engram table: the source's FP8 rows and per-row scales, written interleaved to its
    own file under `engram/` (read row by row at run time, never loaded: outside the shards)."""

    weight: str
    scale: str
    file: str
    rows: int
    head_dim: int

    @property
    def row_bytes(self) -> int:
        return self.head_dim + self.head_dim // FP4_GROUP

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Shard:
    """An output file: its name, its tensors at their offsets in the data section, its header."""

    name: str
    tensors: tuple[tuple[Target, int], ...]
    header: bytes

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for t, _ in self.tensors)


@dataclass
class Plan:
    recipe: Recipe
    source: Source
    jobs: list[Job]
    targets: dict[str, Target]
    shards: list[Shard]
    quantization: dict
    where: dict[str, tuple[str, int]]  # target -> (shard name, file offset of its data)
    config: dict = field(default_factory=dict)  # the config the output describes
    dropped: list[str] = field(default_factory=list)  # source tensors deliberately not converted
    engram: list[EngramTable] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        return sum(h.nbytes for h in self.source.tensors.values())

    @property
    def bytes_out(self) -> int:
        return sum(s.size for s in self.shards) + sum(e.nbytes for e in self.engram)

    @property
    def peak_bytes(self) -> int:
        """Memory the runner holds at most: one job's working set (see `job_bytes`) while the
        previous job's outputs are being written."""
        outputs = max(sum(self.targets[t].nbytes // self.targets[t].pieces for t in j.targets)
                      for j in self.jobs)
        return max(job_bytes(j, self.source.tensors, self.targets) for j in self.jobs) + outputs


def read_source(path: Path) -> Source:
    """Config and tensor headers of a local checkpoint; bad files are refused by name."""
    from safetensors import safe_open

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConvertError(f"{path} is a file; give the checkpoint's directory.")
    if not (path / "config.json").exists():
        raise ConvertError(f"{path} has no config.json: is it a model checkpoint directory?")
    ModelArgs.from_file(path)  # refuses unsupported models, naming the file, before any header
    config = load_json(path / "config.json")
    if (path / INDEX).exists():
        weight_map = load_json(path / INDEX, ConvertError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{path / INDEX} has no weight_map.")
        shards = sorted(set(map(str, weight_map.values())))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    missing = [s for s in shards if not (path / s).exists()]
    if missing:
        raise ConvertError(f"{path}: shard(s) named in {INDEX} are missing: {', '.join(missing)}. "
                           "Download them again (a remote source resumes by itself).")
    if not shards:
        raise ConvertError(f"{path} holds no .safetensors shards.")
    tensors = {}
    for s in shards:
        try:
            with safe_open(str(path / s), "numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    tensors[name] = Header(s, sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as e:  # safetensors raises its own error type for truncated headers
            raise ConvertError(f"{path / s} is truncated or corrupt ({e}); download it again.") from e
    return Source(config, tensors)


def make_plan(source: Source, recipe: str | Recipe = DEFAULT_RECIPE,
              shard_size: int = 5 * 10**9) -> Plan:
    """The jobs and output layout for `recipe`; deterministic for given headers."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    config, dropped = _trunk_config(source.config, source.tensors)
    args = ModelArgs.from_dict(config)
    inventory = list(args.tensors())
    skip = set(dropped)
    _check_names(inventory, {n: h for n, h in source.tensors.items() if n not in skip})
    jobs, targets, quantization, engram = [], {}, dict(recipe.fp8.entry()), []
    for name, shape, role in inventory:
        _check_header(name, shape, role, source.tensors, args.fp8_block)
        if role == "engram":
            engram.append(EngramTable(name, _scale(name), engram_file(name), *shape))
            continue
        job, made, quant = _plan_tensor(name, shape, role, source.tensors[name].dtype, recipe,
                                        args.n_routed_experts, args)
        jobs.append(job)
        for t in made:
            targets.setdefault(t.name, t)
        if quant:
            quantization[job.targets[0][: -len(".weight")]] = quant.entry()
    _check_fusable(recipe, quantization)
    order = {s: k for k, s in enumerate(sorted({h.shard for h in source.tensors.values()}))}
    jobs.sort(key=lambda j: (order[source.tensors[j.weight].shard], j.weight))
    shards, where = _layout(jobs, targets, shard_size)
    return Plan(recipe, source, jobs, targets, shards, quantization, where, config, dropped, engram)


def engram_file(weight: str) -> str:
    """`layers.1.engram.embed.weight` -> `engram/layers.1.safetensors` (engram.table_file)."""
    from ..model.engram import table_file

    return table_file(int(weight.split(".")[1]))


# The release's dtype of every tensor that is not block-quantized (spec §4.3).
RELEASE_DTYPE = {"linear": "BF16", "embed": "BF16", "head": "BF16", "norm": "BF16", "fp32": "F32",
                 "index": "I64", "fp8": "F8_E4M3", "expert": "I8", "engram": "F8_E4M3"}


def recipe_bytes(config: dict | ModelArgs, recipe: str | Recipe, include_mtp: bool = True) -> int:
    """Tensor bytes a conversion of a release with this config writes: exactly what `make_plan`
    lays out for the release's headers (shard headers aside), computed from the config alone."""
    return round(sum(n for _, n, _ in _bytes_by_tensor(config, recipe, include_mtp)))


def decode_bytes(config: dict | ModelArgs, recipe: str | Recipe) -> int:
    """Weight bytes one decoded token reads: the trunk (the runtime does not run MTP) with
    `num_experts_per_tok` of the routed experts and one row of the embedding."""
    args = _release_args(config)
    share = {"expert": args.num_experts_per_tok / args.n_routed_experts, "embed": 1 / args.vocab_size}
    return round(sum(n * share.get(role, 1) for _, n, role in _bytes_by_tensor(config, recipe, False)))


def _bytes_by_tensor(config: dict | ModelArgs, recipe: str | Recipe, include_mtp: bool):
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    args = _release_args(config)
    stacked = {}  # the E experts of one stacked module write equal shares: plan it once
    for name, shape, role in args.tensors(include_mtp):
        if role == "engram":  # its own file, read from disk: never part of the loaded weights
            continue
        m = _EXPERT.match(name) if role == "expert" else None
        key = (m.group(1), m.group(3)) if m else None
        if key not in stacked:
            _, made, _ = _plan_tensor(name, shape, role, RELEASE_DTYPE[role], recipe,
                                      args.n_routed_experts, args)
            # A stacked expert target holds all E experts; this tensor (one expert) writes 1/E.
            n = sum(t.nbytes / t.pieces for t in made)
            if key:
                stacked[key] = n
        yield name, stacked[key] if key else n, role


def engram_bytes(config: dict | ModelArgs) -> int:
    """Bytes of the Engram table files a conversion writes (disk, not memory): the release's
    FP8 rows with their scales, as shipped."""
    args = _release_args(config)
    return sum(math.prod(shape) * (1 + 1 / FP4_GROUP) for _, shape, role in args.tensors(False)
               if role == "engram")


def _release_args(config: dict | ModelArgs) -> ModelArgs:
    if isinstance(config, ModelArgs):
        dspark = DSPARK_KEY in config.extra
        return dataclasses.replace(config, num_nextn_predict_layers=0) if dspark else config
    return ModelArgs.from_dict(_trunk_config(config, {})[0])


# What a V4.1 checkpoint carries that the text runtime does not run: the vision tower and its
# image embeddings (images are refused), the routers' image-token bias, DSpark draft stages.
V41_DROPPED = (r"^(vision|aligner)\.", r"^image_", r"\.ffn\.gate\.bias_vl$", r"^mtp\.")


def _trunk_config(config: dict, tensors) -> tuple[dict, list[str]]:
    config, dropped = dict(config), []
    if config.get("model_type") == "deepseek_v41":
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = dict(config["text_config"], num_nextn_predict_layers=0)
        else:
            config["num_nextn_predict_layers"] = 0
        dropped = sorted(n for n in tensors if any(re.search(p, n) for p in V41_DROPPED))
    elif DSPARK_KEY in config:
        # The -0731 refresh is the same trunk plus DSpark draft stages under mtp.* (spec §1.5),
        # which this runtime cannot run: convert the trunk, drop the stages by name, say so.
        config["num_nextn_predict_layers"] = 0
        dropped = sorted(n for n in tensors if n.startswith("mtp."))
    return config, dropped


def _check_fusable(recipe: Recipe, quantization: dict) -> None:
    for module, q in quantization.items():
        if isinstance(q, dict) and module.endswith(".w1") and quantization.get(module[:-1] + "3") != q:
            raise ConvertError(f"Recipe {recipe.name!r} stores {module} and {module[:-1]}3 "
                               "differently; the model fuses a SwiGLU's w1 and w3 into one "
                               "matrix, so they need the same quantization.")


def _check_names(inventory, tensors: dict[str, Header]) -> None:
    expected = set()
    for name, _, role in inventory:
        expected.add(name)
        if role in ("fp8", "expert", "engram"):
            expected.add(_scale(name))
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ConvertError(f"{len(unknown)} tensor(s) the plan does not know (not in the DeepSeek-V4 "
                           f"inventory of this config): {_names(unknown)}. Refusing to drop them.")
    missing = sorted(expected - set(tensors))
    if missing:
        raise ConvertError(f"{len(missing)} tensor(s) of the DeepSeek-V4 inventory are missing from "
                           f"the checkpoint: {_names(missing)}.")


def _check_header(name, shape, role, tensors, block: int = FP8_BLOCK) -> None:
    h = tensors[name]
    if role == "expert":
        _fp4_shapes(name, shape, h, tensors[_scale(name)])
    elif role == "fp8":
        _fp8_shapes(name, shape, h, tensors[_scale(name)], block)
    elif role == "engram":
        _engram_shapes(name, shape, h, tensors[_scale(name)])
    else:
        _check_plain(name, shape, role, h)


def _plan_tensor(name, shape, role, dtype: str, recipe: Recipe, E: int, args: ModelArgs | None = None):
    """(job, targets it writes, quantization of its module or None) for one official tensor
    whose header has been checked (`dtype` is its source dtype)."""
    module = name[: -len(".weight")]
    if role == "expert":
        o, i = shape
        m = _EXPERT.match(name)
        module = f"{m.group(1)}.{m.group(3)}"
        q = recipe.quant(module, role)
        made = _quantized(module, (E, o), i, q, "BF16", pieces=E)
        action = "fp4" if q == EXPERTS else "fp4_requant"
        return Job(action, name, _scale(name), _names_of(made), q, int(m.group(2))), made, q
    if role == "fp8":
        o, i = shape
        q = recipe.quant(module, role)
        action = "fp8_mx" if q == MXFP8 else "fp8_affine"
        made = _quantized(module, (o,), i, q, "BF16")
        block = args.fp8_block if args is not None else FP8_BLOCK
        return Job(action, name, _scale(name), _names_of(made), q, block=block), made, q
    q = recipe.quant(module, role) if role in ("embed", "head") else None
    if q:
        made = _quantized(module, shape[:-1], shape[-1], q, dtype)
        return Job("affine", name, None, _names_of(made), q), made, q
    v41 = args is not None and args.is_v41
    out = "F32" if keep_float32(name, v41) else "I32" if dtype == "I64" else dtype
    return Job("cast", name, None, (name,)), [Target(name, out, shape)], None


def _quantized(module: str, lead: tuple, fan_in: int, q: Quant, float_dtype, pieces: int = 1):
    """Targets of a quantized module: packed uint32 weight, scales, and biases when affine."""
    if fan_in % q.group_size:
        raise ConvertError(f"{module}: input dimension {fan_in} is not a multiple of the "
                           f"{q.mode} group size {q.group_size}.")
    groups = (*lead, fan_in // q.group_size)
    scales = float_dtype if q.mode == "affine" else "U8"  # mx/nv fp4/fp8 scales are bytes
    made = [Target(f"{module}.weight", "U32", (*lead, fan_in * q.bits // 32), pieces),
            Target(f"{module}.scales", scales, groups, pieces)]
    if q.mode == "affine":
        made.append(Target(f"{module}.biases", float_dtype, groups, pieces))
    return made


def _fp8_shapes(name, shape, h: Header, s: Header, block: int = FP8_BLOCK) -> None:
    o, i = shape
    want = (-(-o // block), -(-i // block))
    if h.dtype != "F8_E4M3" or s.dtype != "F8_E8M0":
        raise ConvertError(f"{name} is {h.dtype} with a {s.dtype} scale; the release format is "
                           f"F8_E4M3 with F8_E8M0 {block}x{block} block scales.")
    if h.shape != (o, i) or s.shape != want:
        raise ConvertError(f"{name} has shape {list(h.shape)} and its scale {_scale(name)} "
                           f"{list(s.shape)}; the config implies [{o}, {i}] with a "
                           f"{list(want)} grid of {block}x{block} block scales.")


def _engram_shapes(name, shape, h: Header, s: Header) -> None:
    rows, hd = shape
    want = (rows, hd // FP4_GROUP)
    if h.dtype != "F8_E4M3" or s.dtype != "F8_E8M0" or h.shape != (rows, hd) or s.shape != want:
        raise ConvertError(f"{name} is {h.dtype} {list(h.shape)} with a {s.dtype} scale "
                           f"{list(s.shape)}; an Engram table of this config is F8_E4M3 "
                           f"[{rows}, {hd}] with F8_E8M0 {list(want)} scales (one per 32 values).")


def _fp4_shapes(name, shape, h: Header, s: Header) -> None:
    o, i = shape
    if h.dtype != "I8" or s.dtype != "F8_E8M0":
        raise ConvertError(f"{name} is {h.dtype} with a {s.dtype} scale; only FP4 experts (I8, two "
                           "codes per byte, F8_E8M0 scale per 32) are supported.")
    # Spec §4.5: FP4 is recognised by the scale covering 16 bytes (32 values) per entry.
    if h.shape != (o, i // 2) or s.shape != (o, i // FP4_GROUP) or s.shape[-1] * 16 != h.shape[-1]:
        raise ConvertError(f"{name} has shape {list(h.shape)} and its scale {_scale(name)} "
                           f"{list(s.shape)}; FP4 experts of this config are [{o}, {i // 2}] bytes "
                           f"with [{o}, {i // FP4_GROUP}] scales.")


def _check_plain(name, shape, role, h: Header) -> None:
    ok = ("I64", "I32") if role == "index" else _FLOATS
    if h.dtype not in ok:
        raise ConvertError(f"{name} is {h.dtype}; expected one of {', '.join(ok)}.")
    if h.shape != tuple(shape):
        raise ConvertError(f"{name} has shape {list(h.shape)}; the config implies {list(shape)}.")


def _layout(jobs: list[Job], targets: dict[str, Target], shard_size: int):
    """Targets in job order, cut into shards of at most `shard_size` bytes (one tensor may exceed)."""
    ordered = list(dict.fromkeys(t for j in jobs for t in j.targets))
    groups, size = [[]], 0
    for name in ordered:
        n = targets[name].nbytes
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(targets[name])
        size += n
    shards, where = [], {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        placed, offset = [], 0
        for t in group:
            placed.append((t, offset))
            offset += t.nbytes
        header = _header(placed)
        for t, off in placed:
            where[t.name] = (fname, 8 + len(header) + off)
        shards.append(Shard(fname, tuple(placed), header))
    return shards, where


def _header(placed) -> bytes:
    meta = {"__metadata__": {"format": "mlx"}}
    for t, off in placed:
        meta[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
    blob = json.dumps(meta, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors pads


def job_bytes(job: Job, tensors: dict[str, Header], targets: dict[str, Target]) -> int:
    """Memory one job holds at its peak: its inputs, outputs and the temporaries of its action."""
    source = tensors[job.weight]
    n = math.prod(source.shape)
    inputs = source.nbytes + (tensors[job.scale].nbytes if job.scale else 0)
    if job.action == "cast":  # a copy only when the dtype changes
        out = targets[job.targets[0]]
        return inputs + (out.nbytes if out.dtype != source.dtype else 0)
    # Bytes per value beyond the inputs, rounded up from ru_maxrss measurements on mlx 0.32.4:
    # fp8_affine holds bf16 values and their scaled copy (measured 1.6, outputs included);
    # affine holds only its output (1.06 at 8 bits); the repacks their expanded scales.
    per_value = {"fp8_affine": 4, "affine": 2, "fp8_mx": 1, "fp4": 0, "fp4_requant": 6}[job.action]
    return inputs + per_value * n


def _scale(weight: str) -> str:
    return weight[: -len("weight")] + "scale"


def _names_of(targets) -> tuple[str, ...]:
    return tuple(t.name for t in targets)

