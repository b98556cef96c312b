"""Memory planner: will this model and this context fit this machine, before anything is allocated.

Weight bytes come from a converted directory's shard headers (nothing is read beyond them) or,
for a bare config, from the tensor inventory and a conversion recipe. KV bytes come from the
cache classes themselves (`make_cache` with lazy arrays allocates nothing), so the plan and the
pools cannot disagree. V4.1's Engram tables stay on the SSD (model/engram.py): they count as
disk, never as memory. Activation peaks are an estimate from the shapes of the largest
intermediates of a prefill chunk and of a decode step. Each of these figures is `sizes.py`'s;
this module adds them up per recipe, context, batch, machine and pipeline rank.
"""

from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from .config import ModelArgs, load_json, released_config
from .sizes import (OFFICIAL_BYTES, GiB, ExpertBytes, PlanError, default_recipe, activation_bytes, engram_disk_bytes,  # noqa: F401 (re-exported)
                    expert_bytes, expert_bytes_from_dir, format_bytes, machine_budget, parse_size, state_bytes,
                    recipes, shard_header, weight_bytes, weight_bytes_from_dir, with_reserve)

@dataclass
class Plan:
    model: str
    recipe: str
    context: int
    kv_bits: int | None
    prefill_chunk: int
    weight_bytes: int
    kv_bytes: int
    fixed_bytes: int
    prefill_bytes: int
    decode_bytes: int
    budget_bytes: int
    budget_source: str
    kv_bytes_per_token: float
    largest_context: int
    max_prefill_chunk: int = 0  # largest prefill chunk whose activations fit what is left
    experts: ExpertBytes | None = None  # routed experts' share of the weights
    expert_memory: int | None = None  # streaming: the resident-expert cache; None: all resident
    batch: int = 1  # sequences decoding together, each with its own state of `context` tokens
    engram_bytes: int = 0  # V4.1's Engram tables: on the SSD, read a few rows per token
    engram_read_bytes: int = 0  # the table bytes one token reads (rows times row bytes)
    splits: list[range] | None = None  # under mlx.launch: every rank's layers (this plan is one's)

    @property
    def streams(self) -> bool:
        return self.expert_memory is not None

    @property
    def resident_weight_bytes(self) -> int:
        """Weights held in memory: all of them, or the rest plus the expert cache when streaming."""
        if not self.streams:
            return self.weight_bytes
        return self.weight_bytes - self.experts.total + min(self.expert_memory, self.experts.total)

    @property
    def cache_share(self) -> float:
        """The expert cache as a share of all routed experts (the hit rate of uniform routing)."""
        return min(1.0, self.expert_memory / self.experts.total) if self.streams else 1.0

    def ssd_bytes_per_token(self, hit_rate: float | None = None) -> int:
        """Expected expert bytes a decoded token reads from disk at `hit_rate` (default: the
        cache share, what routing with no favourite experts would give)."""
        rate = self.cache_share if hit_rate is None else hit_rate
        return round(self.experts.per_token * (1 - rate)) if self.streams else 0

    @property
    def run_chunk(self) -> int:
        """The prefill chunk to run: the asked one, bounded by what fits beside the rest."""
        return min(self.prefill_chunk, self.max_prefill_chunk) if self.max_prefill_chunk else self.prefill_chunk

    @property
    def total_bytes(self) -> int:
        return self.resident_weight_bytes + self.kv_bytes + self.fixed_bytes + max(
            self.prefill_bytes, self.decode_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    def verdict(self) -> str:
        gib = lambda b: format_bytes(b, 1)  # noqa: E731
        if self.fits:
            return (f"fits: {gib(self.total_bytes)} of {gib(self.budget_bytes)} "
                    f"({gib(self.headroom_bytes)} to spare); largest context that fits: "
                    f"{self.largest_context:,} tokens")
        if self.largest_context > 0:
            return (f"does not fit: needs {gib(self.total_bytes)}, the budget is "
                    f"{gib(self.budget_bytes)}; largest context that fits: {self.largest_context:,} tokens")
        need = self.resident_weight_bytes + self.fixed_bytes + self.decode_bytes
        return (f"does not fit at any context: the weights alone need {gib(self.resident_weight_bytes)} "
                f"(with state and activations {gib(need)} before any KV), the budget is "
                f"{gib(self.budget_bytes)}")


def expert_cache_bytes(plan: Plan) -> int:
    """The largest expert cache that fits beside everything else at the plan's context."""
    rest = (plan.weight_bytes - plan.experts.total + plan.kv_bytes + plan.fixed_bytes
            + max(plan.prefill_bytes, plan.decode_bytes))
    return max(0, min(plan.experts.total, plan.budget_bytes - rest))


def plan_memory(model: str | Path | ModelArgs, *, context: int, recipe: str | None = None,
                kv_bits: int | None = None, prefill_chunk: int = 512,
                memory: int | None = None, expert_memory: int | str | None = None,
                other_bytes: int = 0, batch: int = 1) -> Plan:
    """Plan a model (converted dir, config.json, or ModelArgs) at `context` tokens.

    `memory` is a what-if machine size (e.g. a 256 GiB Mac); the plan then keeps the same OS
    reserve a Mac would. Without it, this machine's budget is used. `expert_memory` streams the
    routed experts from disk through a cache of that many bytes; "auto" streams only when the
    weights do not fit resident, with the largest cache that fits beside the rest. `other_bytes`
    is memory the runtime keeps besides the model (the prompt cache): it comes off the budget.
    `batch` plans that many sequences decoding together (`serve --max-batch`), each with the
    state of a full context, and the activations of a decode step over all of them.
    """
    args, wbytes, recipe, name = _weights(model, recipe)
    if not 1 <= context <= args.max_position_embeddings:
        raise PlanError(f"A context of {context:,} tokens is outside what {name} supports "
                        f"(1 to {args.max_position_embeddings:,}).")
    if memory is not None:
        budget, source = with_reserve(memory), f"{memory / GiB:.0f} GiB machine less an OS reserve"
    else:
        budget, source = machine_budget()
    if other_bytes:
        budget -= other_bytes
        source += f", less {other_bytes / GiB:.1f} GiB kept for the prompt cache"
    if batch < 1:
        raise PlanError(f"A batch of {batch} sequences is not a batch; give 1 or more.")
    if kv_bits == 4 and not args.is_v41:
        raise PlanError("--kv-bits 4 stores V4.1's pools in their official FP4 formats; a V4 model "
                        "takes --kv-bits 8 or bf16 pools.")
    pools, fixed = state_bytes(args, context, kv_bits)
    per_token = pools / max(context, 1)
    chunk = max(1, min(prefill_chunk, context))
    plan = Plan(name, recipe, context, kv_bits, chunk, wbytes, batch * pools, batch * fixed,
                activation_bytes(args, chunk, context, kv_bits),
                batch * activation_bytes(args, 1, context, kv_bits), budget, source, per_token, 0,
                batch=batch)
    plan.engram_bytes, plan.engram_read_bytes = engram_disk_bytes(args)
    if expert_memory is not None:
        plan.experts = e = _experts(model, args, recipe)
        if expert_memory != "auto" or (not plan.fits and e.total):
            # A step stacks the experts it picks, on top of the cache: all of them in a prefill chunk.
            plan.prefill_bytes += min(args.n_routed_experts, chunk * args.num_experts_per_tok) * e.each
            plan.decode_bytes += min(args.n_routed_experts, batch * args.num_experts_per_tok) * e.each
            plan.expert_memory = expert_cache_bytes(plan) if expert_memory == "auto" else int(expert_memory)
    plan.largest_context = _largest_context(args, plan)
    plan.max_prefill_chunk = _max_prefill_chunk(args, plan)
    return plan


def is_converted(model: str | Path | ModelArgs) -> bool:
    """A converted model directory (its weights are counted from its shards, recipe and all)."""
    if isinstance(model, ModelArgs):
        return False
    path = Path(model).expanduser()
    return path.is_dir() and any(path.glob("*.safetensors"))


def plan_recipes(model: str | Path | ModelArgs, *, context: int, kv_bits: int | None = None,
                 prefill_chunk: int = 512, memory: int | None = None,
                 expert_memory: int | str | None = None, batch: int = 1) -> list[Plan]:
    """One plan per conversion recipe for a release or a config (not a converted directory,
    whose recipe is fixed): which recipes fit this machine, and the context each leaves."""
    if is_converted(model):
        raise PlanError(f"{model} is a converted model, its recipe is fixed; plan its release "
                        "(flash, pro) or a config.json to compare recipes.")
    return [plan_memory(model, context=context, recipe=r, kv_bits=kv_bits, prefill_chunk=prefill_chunk,
                        memory=memory, expert_memory=expert_memory, batch=batch)
            for r in recipes() if r != "official"]


def plan_context(path: str | Path, max_context: int | None = None, *, kv_bits: int | None = None,
                 prefill_chunk: int = 512, expert_memory: int | None = None,
                 other_bytes: int = 0, batch: int = 1) -> tuple[Plan, int]:
    """(plan, context to run) for a converted model: the asked context if it fits, else an error;
    with none asked, the largest context that fits this machine, capped by the model's maximum.
    `expert_memory` plans the routed experts streamed through a cache of that size; `other_bytes`
    comes off the budget (see `plan_memory`); `batch` plans that many sequences at that context
    each, and is refused when they do not fit. Started by `mlx.launch` with several ranks, it
    plans this rank's share of a pipeline (`plan_rank`, every rank's budget gathered)."""
    from .launch import launched

    if launched():
        from .model.pipeline import gather_budgets, launched_group

        if (group := launched_group()) is not None:
            return plan_rank(path, gather_budgets(group, machine_budget()[0]), group.rank(), max_context,
                             kv_bits=kv_bits, prefill_chunk=prefill_chunk)

    def plan_at(context: int) -> Plan:
        return plan_memory(path, context=context, kv_bits=kv_bits, prefill_chunk=prefill_chunk,
                           expert_memory=expert_memory, other_bytes=other_bytes, batch=batch)

    if batch > 1:
        return _settle(path, plan_at, max_context, f"{batch} sequences of", f"with {batch} sequences ",
                       "; fewer sequences (--max-batch) need less")
    return _settle(path, plan_at, max_context)


def _settle(path, plan_at, max_context: int | None, asked: str = "with", who: str = "",
            fewer: str = ""):
    """(plan, context) from `plan_at(context)`: the asked context if it fits, else refused with
    the plan's verdict; with none asked, the largest that fits, capped by the model's maximum.
    The plan returned is made at the context that will run (it sizes the limits and chunk)."""
    limit = ModelArgs.from_file(path).max_position_embeddings
    plan = plan_at(max_context or limit)
    name = Path(path).name
    if max_context is not None and not plan.fits:
        raise PlanError(f"{name} {asked} {max_context:,} tokens of context {plan.verdict()}{fewer}")
    context = max_context or min(plan.largest_context, limit)
    if context <= 0:
        raise PlanError(f"{name} {who}{plan.verdict()}{fewer}")
    if context != plan.context:
        plan = plan_at(context)
    return plan, context


MAX_DEFAULT_BATCH = 8  # past this, decode gains little per added sequence (benchmarks/batch.py)


def default_batch(plan: Plan, path: str | Path | ModelArgs, **options) -> int:
    """The most sequences (up to MAX_DEFAULT_BATCH) that fit at the plan's context: what
    `serve` batches when no `--max-batch` is given."""
    n = 1
    while n < MAX_DEFAULT_BATCH and plan_memory(
            path, context=plan.context, kv_bits=plan.kv_bits, prefill_chunk=plan.prefill_chunk,
            batch=n + 1, **options).fits:
        n += 1
    return n


def _max_prefill_chunk(args: ModelArgs, plan: Plan) -> int:
    """The largest power-of-two chunk (64..4096) whose activations fit beside the rest."""
    room = plan.budget_bytes - plan.resident_weight_bytes - plan.kv_bytes - plan.fixed_bytes
    chunk = 64
    while chunk < 4096 and activation_bytes(args, chunk * 2, plan.context, plan.kv_bits) <= room:
        chunk *= 2
    return chunk


def apply_wired_limit(plan: Plan) -> str | None:
    """On macOS let the GPU keep the planned bytes wired; returns what was done, for the user.

    MLX caps wired memory at the GPU's recommended working set unless told otherwise; the OS
    caps it at `iogpu.wired_limit_mb`, which only an administrator can raise.
    """
    if platform.system() != "Darwin":
        return None
    import mlx.core as mx

    target = min(plan.total_bytes, plan.budget_bytes)
    try:
        mx.set_wired_limit(target)
    except Exception as e:  # the OS cap is below the plan
        return (f"could not raise the wired memory limit to {target / GiB:.1f} GiB ({e}); "
                f"run `sudo sysctl iogpu.wired_limit_mb={math.ceil(target / (1 << 20))}` once")
    return f"wired memory limit raised to {target / GiB:.1f} GiB, the planned size"


def _largest_context(args: ModelArgs, plan: Plan) -> int:
    """Largest context (up to the model's maximum) whose plan fits the budget."""
    def fits(ctx: int) -> bool:
        pools, fixed = state_bytes(args, ctx, plan.kv_bits)
        act = max(activation_bytes(args, min(plan.prefill_chunk, ctx), ctx, plan.kv_bits),
                  plan.batch * activation_bytes(args, 1, ctx, plan.kv_bits))
        return plan.resident_weight_bytes + plan.batch * (pools + fixed) + act <= plan.budget_bytes

    return _largest(fits, args.max_position_embeddings)


def _largest(fits, hi: int) -> int:
    """The largest context in 0…hi for which `fits(context)` holds (it holds for all below)."""
    lo = hi if fits(hi) else 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _experts(model, args: ModelArgs, recipe: str) -> ExpertBytes:
    if is_converted(model):
        return expert_bytes_from_dir(Path(model).expanduser(), args)
    return expert_bytes(args, recipe)


def _weights(model, recipe):
    if isinstance(model, ModelArgs):
        recipe = recipe or default_recipe()
        return model, weight_bytes(model, recipe), recipe, "config"
    path = Path(model).expanduser()
    release = None if path.exists() else released_config(str(model))
    if release is not None:
        recipe = recipe or default_recipe()
        args = ModelArgs.from_dict(release)
        return args, weight_bytes(args, recipe), recipe, str(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.exists():
        raise PlanError(f"{model}: no config.json there; give a converted model directory, a "
                        f"config.json, or a release (flash, pro, deepseek-ai/DeepSeek-V4-Flash).")
    config = load_json(config_path)
    args = ModelArgs.from_file(config_path)
    converted = path.is_dir() and any(path.glob("*.safetensors"))
    if converted and recipe is None:
        meta = config.get("mlx_dsv4", {})
        return args, weight_bytes_from_dir(path), meta.get("recipe", "converted"), str(path)
    recipe = recipe or default_recipe()
    return args, weight_bytes(args, recipe), recipe, str(path)


# ----- several Macs: pipeline stages -------------------------------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)\.")


def layer_weight_bytes(model: str | Path | ModelArgs, recipe: str | None = None) -> tuple[list[int], int]:
    """(weight bytes of each trunk layer, bytes of the rest a pipeline loads: embedding, final
    norm, head and its mHC collapse). MTP blocks are left out: pipeline mode does not run them."""
    args, _, recipe, _ = _weights(model, recipe)
    per_layer, rest = [0] * args.num_hidden_layers, 0
    path = Path(model).expanduser() if not isinstance(model, ModelArgs) else None
    if path is not None and is_converted(path) and recipe not in recipes():
        items = ((name, v["data_offsets"][1] - v["data_offsets"][0])
                 for f in sorted(path.glob("*.safetensors")) for name, v in shard_header(f).items())
    elif recipe == "official":
        items = ((n, math.prod(s) * OFFICIAL_BYTES[r]) for n, s, r in args.tensors(False))
    else:
        from .convert.plan import _bytes_by_tensor  # the per-tensor form of recipe_bytes

        items = ((n, b) for n, b, _ in _bytes_by_tensor(args, recipe, False))
    for name, n in items:
        if (m := _LAYER.match(name)) is not None:
            per_layer[int(m.group(1))] += n
        elif not name.startswith("mtp."):
            rest += n
    return [round(b) for b in per_layer], round(rest)


def split_layers(layer_bytes: list[int], budgets: list[int], first_extra: int = 0,
                 cuts: set[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per host in rank order, so that each host's bytes (its
    layers, plus `first_extra` on host 0) are in proportion to its budget; each gets a layer.
    `cuts`: the layers a range may start at (V4.1: `ModelArgs.pipeline_cuts`), default any."""
    L, n = len(layer_bytes), len(budgets)
    if n < 1 or L < n:
        raise PlanError(f"{n} host(s) for {L} layer(s): a pipeline needs one layer per host at least.")
    allowed = sorted(cuts) if cuts is not None else list(range(1, L))
    if len(allowed) < n - 1:
        raise PlanError(f"{n} hosts: this model's layers can be cut only at {allowed}, so a "
                        f"pipeline has at most {len(allowed) + 1} stages.")
    if min(budgets) <= 0:
        raise PlanError("Every host needs a positive memory budget.")
    total, whole = sum(layer_bytes) + first_extra, sum(budgets)
    cum = [first_extra]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
    bounds, share = [0], 0
    for k in range(n - 1):
        share += budgets[k]
        target = total * share / whole
        # The cut whose cumulative bytes land nearest this host's cumulative share, leaving
        # enough cuts for the hosts after it.
        options = [c for c in allowed if c > bounds[-1]]
        options = options[: len(options) - (n - 2 - k)]
        bounds.append(min(options, key=lambda i: abs(cum[i] - target)))
    bounds.append(L)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Stage:
    """One host of a pipeline plan: its layers and its bytes at the plan's context."""
    host: str
    layers: range
    weight_bytes: int
    kv_bytes: int
    fixed_bytes: int
    activation_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.fixed_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes


@dataclass
class PipelinePlan:
    model: str
    recipe: str
    context: int
    stages: list[Stage]
    largest_context: int
    hop_bytes_per_token: int  # the residual streams one decoded token sends over each hop

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def verdict(self) -> str:
        n = len(self.stages)
        if self.fits:
            return (f"fits on {n} host(s); largest context that fits them all: "
                    f"{self.largest_context:,} tokens")
        worst = max(self.stages, key=lambda s: s.total_bytes - s.budget_bytes)
        where = (f"largest context that fits: {self.largest_context:,} tokens" if self.largest_context
                 else "no context fits")
        return (f"does not fit on {n} host(s): {worst.host} (layers {worst.layers.start}-"
                f"{worst.layers.stop - 1}) needs {format_bytes(worst.total_bytes, 1)} of "
                f"{format_bytes(worst.budget_bytes, 1)}; {where}")


def _stage_state(args: ModelArgs, layers: range, context: int, kv_bits: int | None) -> tuple[int, int]:
    import mlx.core as mx

    from .model.cache import LayerCache

    pools = fixed = 0
    for i in layers:  # lazy zeros: nothing is allocated
        c = LayerCache(args, i, 1, mx.bfloat16, max(context, 1), kv_bits)
        p = sum(part.nbytes for part in (c.kv_pool, c.index_pool) if part is not None)
        pools, fixed = pools + p, fixed + c.nbytes - p
    return pools, fixed


def pipeline_split(model: str | Path | ModelArgs, budgets: list[int],
                   recipe: str | None = None) -> list[range]:
    """The layer ranges of a pipeline over hosts with these budgets (rank order): weights in
    proportion to memory, host 0 also holding the embedding and head. `plan_pipeline` and
    `plan_rank` (whose split `weights.load_pipeline` loads) both cut here, so the plan describes
    what is loaded."""
    per_layer, extra = layer_weight_bytes(model, recipe)
    return split_layers(per_layer, budgets, extra, _weights(model, recipe)[0].pipeline_cuts())


def plan_pipeline(model: str | Path | ModelArgs, hosts: list[tuple[str, int]], *, context: int,
                  recipe: str | None = None, kv_bits: int | None = None,
                  prefill_chunk: int = 512, reserve: bool = True) -> PipelinePlan:
    """Split a model over `hosts` ((name, memory bytes) in rank order) for a pipeline run.

    Each host's budget is its memory less the OS reserve a Mac keeps (`reserve=False`: the bytes
    are budgets already); layers are cut by `pipeline_split`. Each host pays its layers' KV at
    `context` and a forward's activations. The largest context is the one every host fits.
    """
    args, _, recipe, name = _weights(model, recipe)
    if not 1 <= context <= args.max_position_embeddings:
        raise PlanError(f"A context of {context:,} tokens is outside what {name} supports "
                        f"(1 to {args.max_position_embeddings:,}).")
    per_layer, extra = layer_weight_bytes(model, None if is_converted(model) else recipe)
    budgets = [with_reserve(m) if reserve else m for _, m in hosts]
    split = split_layers(per_layer, budgets, extra, args.pipeline_cuts())

    def stages(ctx: int) -> list[Stage]:
        act = max(activation_bytes(args, min(prefill_chunk, ctx), ctx, kv_bits),
                  activation_bytes(args, 1, ctx, kv_bits))
        out = []
        for k, ((host, _), layers, budget) in enumerate(zip(hosts, split, budgets)):
            pools, fixed = _stage_state(args, layers, ctx, kv_bits)
            w = sum(per_layer[i] for i in layers) + (extra if k == 0 else 0)
            out.append(Stage(host, layers, w, pools, fixed, act, budget))
        return out

    largest = _largest(lambda ctx: all(s.fits for s in stages(ctx)), args.max_position_embeddings)
    hop = args.hc_mult * args.hidden_size * 2  # bf16 streams [1, 1, N, D]
    hop += 4 * args.hc_mult if args.is_v41 else 0  # and V4.1's lagged mHC weights, fp32 [1, 1, N]
    return PipelinePlan(name, recipe, context, stages(context), largest, hop)


def plan_rank(path: str | Path, budgets: list[int], rank: int, max_context: int | None = None, *,
              kv_bits: int | None = None, prefill_chunk: int = 512) -> tuple[Plan, int]:
    """`plan_context` for one rank of a launched pipeline, given every rank's budget: this
    rank's share as a `Plan` (its layers' weights and KV, its budget), with the largest context
    that fits every rank. Refused, naming the rank that does not fit, like `plan_context`."""
    hosts = [(f"rank {r}", b) for r, b in enumerate(budgets)]
    pp, context = _settle(path, lambda ctx: plan_pipeline(
        path, hosts, context=ctx, kv_bits=kv_bits, prefill_chunk=prefill_chunk, reserve=False),
        max_context)
    s, args, name = pp.stages[rank], ModelArgs.from_file(path), Path(path).name
    chunk = max(1, min(prefill_chunk, context))
    source = f"rank {rank} of {len(budgets)}: layers {s.layers.start}-{s.layers.stop - 1}"
    plan = Plan(name, pp.recipe, context, kv_bits, chunk, s.weight_bytes, s.kv_bytes, s.fixed_bytes,
                activation_bytes(args, chunk, context, kv_bits), activation_bytes(args, 1, context, kv_bits),
                s.budget_bytes, source, s.kv_bytes / context, pp.largest_context)
    plan.max_prefill_chunk = _max_prefill_chunk(args, plan)
    plan.splits = [st.layers for st in pp.stages]
    return plan, context


def parse_hosts(hosts: str | None = None, hostfile: str | Path | None = None) -> list[tuple[str, int]]:
    """Hosts as (name, memory bytes) from '512GB,256GB' or from an `mlx.launch` JSON hostfile whose
    entries carry a "memory" field (mlx.launch ignores it), e.g.
    [{"ssh": "mac1", "ips": ["10.0.0.1"], "memory": "512GB"}, ...]."""
    if (hosts is None) == (hostfile is None):
        raise PlanError("Give the hosts' memory as --hosts 512GB,512GB or a --hostfile, not both.")
    if hosts is not None:
        sizes = [s for s in hosts.split(",") if s.strip()]
        try:
            return [(f"host {k}", parse_size(s)) for k, s in enumerate(sizes)]
        except ValueError as e:
            raise PlanError(f"--hosts: {e}") from e
    try:
        data = json.loads(Path(hostfile).read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{hostfile}: cannot read it as JSON ({e}).") from e
    entries = data.get("hosts", []) if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise PlanError(f"{hostfile}: expected a JSON list of hosts (mlx.launch's hostfile format).")
    out = []
    for k, h in enumerate(entries):
        name = h.get("ssh", f"host {k}") if isinstance(h, dict) else f"host {k}"
        if not isinstance(h, dict) or "memory" not in h:
            raise PlanError(f"{hostfile}: host {k} ({name}) has no \"memory\" field, e.g. "
                            f"\"memory\": \"512GB\".")
        try:
            out.append((name, parse_size(str(h["memory"]))))
        except ValueError as e:
            raise PlanError(f"{hostfile}: host {k} ({name}): {e}") from e
    return out
