"""`dsv4 bench`: prefill and decode speed and peak memory of a converted model on this machine.

Plans the context first (the same planner chat and serve use), feeds a seeded random prompt in
planner-sized chunks, then decodes greedily for a fixed number of tokens (EOS is not a stop:
the figure is per token, not per answer). Reports tokens per second for both phases, the decode
time per token, and the measured peak memory next to the planner's prediction, so a user can
check both our speed and our memory arithmetic on their own Mac. `prompt_sizes` adds prefill
alone at each of those prompt lengths (a fresh cache each), since prefill slows with length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from .model.cache import make_cache
from .model.experts_stream import Counters
from .generation.generate import generate_step
from .generation.prefill import prefill
from .plan import Plan, apply_wired_limit, plan_context
from .generation.sampling import make_distribution
from .generation.speculative import MTPDrafter, SpecStats, resolve_draft, speculative_step
from .model.weights import load_model


@dataclass
class PrefillPoint:
    """Prefill alone of a prompt of `tokens` ids into a fresh cache."""

    tokens: int
    seconds: float
    peak_bytes: int

    @property
    def tps(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class BenchResult:
    model: str
    prompt_tokens: int
    generated: int
    prefill_chunk: int
    load_s: float
    prefill_s: float
    decode_s: float
    peak_bytes: int
    plan: Plan
    draft: int = 0
    acceptance: float | None = None  # share of MTP drafts kept (speculation only)
    tokens_per_forward: float | None = None
    experts: Counters | None = None  # streamed experts: look-ups of the decode phase
    prefill_read: int = 0  # streamed experts: bytes read from disk during the prefill
    prefill_sizes: list[PrefillPoint] | None = None  # prefill alone at each asked prompt size

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; decode time covers the rest.
        return (self.generated - 1) / max(self.decode_s, 1e-9)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.generated - 1, 1)


def run_bench(model_dir: str | Path, *, prompt_tokens: int = 2048, gen_tokens: int = 128,
              prefill_chunk: int = 512, kv_bits: int | None = None, seed: int = 0,
              log: Callable[[str], None] | None = None,
              progress: Callable[[int, int], None] | None = None,
              draft: int | None = None, expert_memory: int | str | None = None,
              prompt_sizes: Sequence[int] = ()) -> BenchResult:
    """`progress(done, total)` hears of prompt tokens prefilled: (0, total) as the prefill
    starts, after each chunk, and (total, total) with the first token. `expert_memory` (bytes,
    or "auto": what the plan leaves) streams the routed experts from disk through a cache.
    `prompt_sizes` also times prefill alone at each size (the context is planned for the
    largest, so one that cannot fit is refused before anything loads)."""
    if prompt_tokens < 1 or gen_tokens < 2:
        raise ValueError("bench needs at least 1 prompt token and 2 generated tokens.")
    if any(n < 1 for n in prompt_sizes):
        raise ValueError(f"prompt sizes must be at least 1 token, got {list(prompt_sizes)}.")
    path = Path(model_dir)
    need = max([prompt_tokens + gen_tokens, *prompt_sizes])
    plan, context = plan_context(path, need, kv_bits=kv_bits,
                                 prefill_chunk=prefill_chunk, expert_memory=expert_memory)
    chunk = plan.run_chunk
    wired = apply_wired_limit(plan)
    if log and wired:
        log(wired)
    t = time.perf_counter()
    model = load_model(path, expert_memory=plan.expert_memory, splits=plan.splits)
    store = getattr(model, "expert_store", None)
    load_s = time.perf_counter() - t
    if log:
        log(f"loaded {path.name} in {load_s:.1f} s")
    prompt = _random_prompt(model, prompt_tokens, seed)
    cache = make_cache(model, max_tokens=context, kv_bits=kv_bits)
    mx.clear_cache()
    mx.reset_peak_memory()
    draft = resolve_draft(model, draft)
    stats = SpecStats()
    if draft:  # greedy: the same tokens as plain decoding, in fewer trunk forwards
        steps = speculative_step(model, prompt, cache, MTPDrafter(model),
                                 distribution=make_distribution(0.0), draft=draft,
                                 max_tokens=gen_tokens, prefill_chunk=chunk, progress=progress,
                                 stats=stats)
    else:
        steps = generate_step(model, prompt, cache, max_tokens=gen_tokens, prefill_chunk=chunk,
                              progress=progress)
    if progress:
        progress(0, prompt_tokens)
    before = store.counters.copy() if store else None
    t = time.perf_counter()
    next(steps)  # prefill and the first token
    prefill_s = time.perf_counter() - t
    after_prefill = store.counters.copy() if store else None
    t = time.perf_counter()
    generated = 1 + sum(1 for _ in steps)
    decode_s = time.perf_counter() - t
    experts = store.counters.since(after_prefill) if store else None
    prefill_read = after_prefill.since(before).bytes_read if store else 0
    peak = mx.get_peak_memory()
    del steps, cache
    sizes = [_prefill_alone(model, n, chunk, context, kv_bits, seed) for n in prompt_sizes]
    if store:
        store.close()
    spec = (stats.acceptance, stats.tokens_per_forward) if draft else (None, None)
    return BenchResult(path.name, prompt_tokens, generated, chunk, load_s, prefill_s, decode_s,
                       peak, plan, draft, *spec, experts, prefill_read,
                       sizes if prompt_sizes else None)


def _prefill_alone(model, n: int, chunk: int, context: int, kv_bits: int | None,
                   seed: int) -> PrefillPoint:
    ids = _random_prompt(model, n, seed + n)
    cache = make_cache(model, max_tokens=context, kv_bits=kv_bits)
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    mx.eval(prefill(model, ids, cache, chunk))
    seconds = time.perf_counter() - t
    point = PrefillPoint(n, seconds, mx.get_peak_memory())
    del cache
    mx.clear_cache()
    return point


def _random_prompt(model, n: int, seed: int) -> list[int]:
    """`n` seeded ids from the vocabulary, past the two special ids at its start."""
    return mx.random.randint(2, model.args.vocab_size, (n,), key=mx.random.key(seed)).tolist()
