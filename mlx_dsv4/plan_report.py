"""The planner's answers as people read them: the rich tables and verdict sentences of
`dsv4 plan` (one model, every recipe, a pipeline over several Macs) and `dsv4 convert --dry-run`.

The planner (`plan.py`) computes; this module only lays its results out, so the CLI parses,
calls one of each, and prints. Imports rich only, lazily inside each function.
"""

from __future__ import annotations

from .sizes import default_recipe, format_bytes as gib


def pipeline_table(p):
    """`dsv4 plan --hosts`: what each Mac of a pipeline holds, against its budget."""
    from rich.table import Table

    table = Table(title=f"{p.model} · {p.recipe} · {p.context:,} tokens · pipeline over "
                        f"{len(p.stages)} hosts")
    for col in ("host", "layers", "weights", "KV", "state + activations", "total", "budget", ""):
        table.add_column(col, justify="left" if col in ("host", "layers", "") else "right")
    for k, s in enumerate(p.stages):
        extra = " + embed/head" if k == 0 else ""
        table.add_row(s.host, f"{s.layers.start}-{s.layers.stop - 1}{extra}", gib(s.weight_bytes),
                      gib(s.kv_bytes), gib(s.fixed_bytes + s.activation_bytes), gib(s.total_bytes),
                      gib(s.budget_bytes), "fits" if s.fits else "too big")
    return table


def pipeline_verdict(p) -> str:
    return (f"{p.verdict()}. Each hop carries {p.hop_bytes_per_token:,} bytes of activations "
            "per decoded token.")


def memory_table(p, kv_bits, hit_rate=None):
    """`dsv4 plan MODEL --recipe R`: weights, KV, state, activations, total and budget."""
    from rich.table import Table

    pools = _pools(kv_bits)
    seqs = f" · {p.batch} sequences" if p.batch > 1 else ""
    table = Table(title=f"{p.model} · {p.recipe} · {p.context:,} tokens{seqs}", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row("weights", gib(p.weight_bytes))
    if p.streams:
        table.add_row("of which held in memory (expert cache included)", gib(p.resident_weight_bytes))
        table.add_row(f"expert cache ({p.cache_share:.0%} of the routed experts)", gib(p.expert_memory))
        table.add_row(_ssd_label(p, hit_rate), _gb(p.ssd_bytes_per_token(hit_rate)))
    table.add_row(f"KV pools ({pools}, {p.kv_bytes_per_token:,.0f} B/token)", gib(p.kv_bytes))
    each = f", {p.batch} sequences" if p.batch > 1 else ""
    table.add_row(f"fixed per-sequence state{each}", gib(p.fixed_bytes))
    table.add_row(f"prefill activations ({p.prefill_chunk:,}-token chunk)", gib(p.prefill_bytes))
    table.add_row(f"decode activations{f' ({p.batch} rows)' if p.batch > 1 else ''}", gib(p.decode_bytes))
    table.add_row("total", gib(p.total_bytes))
    table.add_row(f"budget ({p.budget_source})", gib(p.budget_bytes))
    if p.engram_bytes:
        table.add_row(_engram_label(p), gib(p.engram_bytes))
    return table


def _pools(kv_bits) -> str:
    return {8: "8-bit", 4: "FP4"}.get(kv_bits, "bf16")


def _engram_label(p) -> str:
    return f"Engram tables, on SSD and not in memory ({p.engram_read_bytes / 1e3:,.1f} KB read per token)"


def _ssd_label(p, hit_rate) -> str:
    rate = p.cache_share if hit_rate is None else hit_rate
    return f"read from SSD per token at a {rate:.0%} hit rate"


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def recipes_table(plans, kv_bits, hit_rate=None):
    """`dsv4 plan flash`: every recipe's weights, total and largest context on this budget."""
    from rich.table import Table

    first = plans[0]
    caption = f"KV pools {_pools(kv_bits)}, {first.kv_bytes_per_token:,.0f} B/token"
    if first.engram_bytes:
        caption += f"; {_engram_label(first)}: {gib(first.engram_bytes, 1)}"
    table = Table(title=f"{first.model} · {first.context:,} tokens · budget {gib(first.budget_bytes, 1)} "
                        f"({first.budget_source})", caption=caption, title_justify="left")
    streams = any(p.streams for p in plans)
    extra = ("expert cache", "SSD per token") if streams else ()
    for name in ("recipe", "weights", *extra, "total", "largest context", f"at {first.context:,} tokens"):
        table.add_column(name, justify="left" if name == "recipe" else "right")
    for p in plans:
        label = f"{p.recipe} (default)" if p.recipe == default_recipe() else p.recipe
        cells = ()
        if streams:
            rate = p.cache_share if hit_rate is None else hit_rate
            cells = (f"{gib(p.expert_memory)} ({p.cache_share:.0%})" if p.streams else "all resident",
                     f"{_gb(p.ssd_bytes_per_token(hit_rate))} at {rate:.0%} hits" if p.streams else "0")
        table.add_row(label, gib(p.weight_bytes), *cells, gib(p.total_bytes),
                      f"{p.largest_context:,}" if p.largest_context else "none",
                      "fits" if p.fits else "does not fit")
    return table


def recipes_verdict(plans, hit_rate=None) -> str:

    fit = [p for p in plans if p.largest_context > 0]
    streamed = [p for p in fit if p.streams]
    if streamed:
        p = next((p for p in streamed if p.recipe == default_recipe()), streamed[0])
        rate = p.cache_share if hit_rate is None else hit_rate
        return (f"Streams experts from SSD: {p.recipe} holds {gib(p.resident_weight_bytes, 1)} of its "
                f"weights in memory, {gib(p.expert_memory, 1)} of them a cache of "
                f"{p.cache_share:.0%} of the routed experts; each token reads "
                f"{_gb(p.ssd_bytes_per_token(hit_rate))} from SSD at a {rate:.0%} hit rate "
                f"(up to {p.largest_context:,} tokens of context). Run it with --expert-memory "
                f"{p.expert_memory // 2**30}GB.")
    if not fit:
        small = min(plans, key=lambda p: p.weight_bytes)
        return (f"No recipe fits: the smallest, {small.recipe}, needs {gib(small.weight_bytes, 1)} for "
                f"its weights alone; the budget is {gib(small.budget_bytes, 1)}.")
    return "Recipes that fit: " + ", ".join(f"{p.recipe} (up to {p.largest_context:,} tokens)"
                                            for p in fit) + "."


def convert_table(source: str, result):
    """`dsv4 convert --dry-run`: tensors, bytes and shards in and out, disk and memory needed."""
    from rich.table import Table

    plan = result.plan
    table = Table(title=f"dsv4 convert {source} — recipe {plan.recipe.name}: {plan.recipe.summary}",
                  show_header=True)
    table.add_column("")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_row("tensors", f"{len(plan.source.tensors):,}", f"{len(plan.targets):,}")
    table.add_row("bytes", size(plan.bytes_in), size(plan.bytes_out))
    table.add_row("shards", f"{len({h.shard for h in plan.source.tensors.values()})}",
                  f"{len(plan.shards)}")
    download = f" (incl. download up to {size(result.download_bytes)})" if result.download_bytes else ""
    table.add_row("disk needed", "", size(result.disk_bytes) + download)
    if plan.dropped:
        from .convert import dropped_note

        table.add_row("not converted", "", dropped_note(plan))
    if plan.engram:  # V4.1: copied as shipped, read row by row at run time, never loaded
        tables = size(sum(t.nbytes for t in plan.engram))
        table.add_row("Engram tables", "", f"{len(plan.engram)} files, {tables} (on disk at run time)")
    table.add_row("peak memory", "", f"{size(plan.peak_bytes)} + interpreter")
    return table


def size(n: int) -> str:
    """Bytes in MB below a GB, else GB with GiB beside."""
    if n < 10**9:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"
