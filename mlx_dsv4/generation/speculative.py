"""Speculative decoding: a drafter proposes up to k tokens, the trunk checks them in one forward.

One round: y0 is drawn from the target distribution the trunk already gave; the drafter proposes
d1..dk after it; the trunk runs [y0, d1..dk] as one chunk (one read of the weights for k+1
tokens) and each d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)) (p: target, q: draft,
both after the same processors, filters and temperature). At the first refusal a replacement
is drawn from max(p_i - q_i, 0), normalised; this keeps the output distribution exactly the
target's, and at temperature 0 (one-hot p and q) it is plain greedy decoding.

Rollback: V4 state cannot be trimmed, so a round snapshots the cache first (O(1): small arrays
by reference, pool counts). After a refusal it restores the snapshot and feeds the kept tokens
plus the replacement as one chunk, so a round always commits at least two tokens and the state
equals sequential decoding of exactly those tokens. Tokens are handed out only once the cache
holds them; a consumer that stops mid-round gets the cache rolled back to what it saw.

The MTP drafter runs the checkpoint's MTP block: at position t it reads the trunk's final streams
at t and the token at t+1, with a 128-token window of its own, which it catches up on committed
tokens each round. Drafts beyond the first use its own output streams in place of the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import mlx.core as mx

from ..model.cache import LayerCache, make_cache
from .prefill import check_token_ids, prefill
from .sampling import PROCESSOR_CONTEXT


@dataclass
class SpecStats:
    """Counters of one generation: forwards of the trunk, drafted and accepted tokens."""

    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


class Drafter(Protocol):
    def observe(self, streams: mx.array, next_ids: Sequence[int]) -> None:
        """Trunk streams `[1, S, N, D]` of committed positions and the token after each."""

    def draft(self, streams: mx.array, y0: int, k: int,
              distribution: Callable[[mx.array], mx.array]) -> list[tuple[int, mx.array]]:
        """Up to k tokens after `y0` (whose position's trunk streams are still unknown), each
        with the probabilities `[V]` it was drawn from; `streams` are those before y0.
        `distribution` maps raw logits `[1, V]` to probabilities as the target's are made."""


class MTPDrafter:
    """Drafts with the checkpoint's MTP block (spec §2.11)."""

    def __init__(self, model, position: int = 0):
        """`position`: where the first pair it will see sits (after a reused prefix, whose
        pairs it never saw; its window then starts empty, which costs acceptance only)."""
        self.model = model
        self.cache: list[LayerCache] = make_cache(model, mtp=True)
        for c in self.cache:
            c.offset = position
        self._streams: list[mx.array] = []
        self._ids: list[int] = []

    def observe(self, streams: mx.array, next_ids: Sequence[int]):
        if len(next_ids):
            self._streams.append(streams[:, : len(next_ids)])
            self._ids.extend(next_ids)

    def draft(self, streams, y0, k, distribution):
        X = mx.concatenate(self._streams + [streams], axis=1)
        ids = mx.array(self._ids + [y0])[None]
        self._streams, self._ids = [], []
        logits, out = self.model.mtp_logits(X, ids, self.cache, return_streams=True)
        snap = [c.snapshot() for c in self.cache] if k > 1 else None
        drafts = []
        for i in range(k):
            q = distribution(logits[:, -1])[0]
            d = int(mx.random.categorical(mx.log(q)).item())
            drafts.append((d, q))
            if i + 1 < k:  # its own output streams stand in for the trunk's
                logits, out = self.model.mtp_logits(out[:, -1:], mx.array([[d]]), self.cache,
                                                    return_streams=True)
        if snap is not None:
            for c, s in zip(self.cache, snap):
                c.restore(s)
        return drafts


# benchmarks/spec_cost.py: on a GPU (weight-read bound) a Flash verify of 2 tokens reads ~1.42x
# a step's bytes, so k = 1 pays above ~61% acceptance and wins at the 80-85% reported for the
# MTP head (1.15-1.2x); on a CPU (compute-bound) a 2-token forward costs ~2x and no k pays.
DEFAULT_DRAFT = 1


def resolve_draft(model, draft: int | None) -> int:
    """`draft` as asked; by default DEFAULT_DRAFT on a GPU when the checkpoint has an MTP block,
    and 0 on the CPU backend, where drafting never pays."""
    if draft is not None:
        return draft
    on_gpu = mx.default_device() == mx.gpu
    return DEFAULT_DRAFT if on_gpu and getattr(model, "mtp", None) else 0


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _draw(p: mx.array) -> int:
    return int(mx.random.categorical(mx.log(p)).item())


def verify_draft(p: mx.array, q: mx.array, d: int) -> int | None:
    """Keep draft `d` (drawn from q) with probability min(1, p[d]/q[d]): None. Otherwise return a
    replacement drawn from max(p - q, 0), normalised. Either way the token is distributed as p."""
    if mx.random.uniform().item() < (p[d] / q[d]).item():
        return None
    residual = mx.maximum(p - q, 0)
    total = residual.sum().item()
    return _draw(residual / total) if total > 0 else _draw(p)


def speculative_step(model, prompt_ids: Sequence[int], cache: list[LayerCache], drafter: Drafter,
                     *, distribution: Callable[[mx.array], mx.array], draft: int = 1,
                     logits_processors: list | None = None, max_tokens: int = 256,
                     prefill_chunk: int = 512, history: Sequence[int] = (),
                     progress: Callable[[int, int], None] | None = None,
                     on_prefilled: Callable[[], None] | None = None,
                     on_chunk: Callable[[], None] | None = None,
                     stats: SpecStats | None = None) -> Iterator[tuple[int, mx.array]]:
    """`generate.generate_step` with speculation: yields `(token, logprobs [V])`."""
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("speculative_step needs at least one new prompt token.")
    check_token_ids(ids, model.args.vocab_size)
    stats = stats if stats is not None else SpecStats()
    processors = logits_processors or []
    tail = (list(history) + ids)[-PROCESSOR_CONTEXT:]

    def target(logits_row: mx.array, recent: list[int]) -> mx.array:
        logits = logits_row[None]
        if processors:
            toks = mx.array(recent[-PROCESSOR_CONTEXT:])
            for proc in processors:
                logits = proc(toks, logits)
        return _logprobs(logits)[0]

    def forward(tokens: list[int]):
        logits, streams = model(mx.array(tokens)[None], cache, return_streams=True)
        stats.forwards += 1
        return logits[0], streams

    # The drafter sees each prompt position's streams with the token after it.
    row, last = prefill(model, ids, cache, prefill_chunk, progress, on_prefilled,
                        observe=lambda st, start: drafter.observe(
                            st, ids[start + 1 : start + st.shape[1] + 1]), on_chunk=on_chunk)
    if progress:
        progress(len(ids), len(ids))
    row = row[0]
    n = 0
    while n < max_tokens:
        lp0 = target(row, tail)
        y0 = _draw(distribution(lp0[None])[0])
        k = min(draft, max_tokens - n - 1)
        recent0 = tail + [y0]
        # Called even for k = 0: the MTP drafter catches up on the committed pairs either way.
        drafts = drafter.draft(last, y0, k, lambda lg: distribution(target(lg[0], recent0)[None]))
        stats.drafted += len(drafts)
        snap = [c.snapshot() for c in cache]
        logits, streams = forward([y0] + [d for d, _ in drafts])
        kept, out_lps, recent, replacement = [y0], [lp0], tail + [y0], None
        for i, (d, q) in enumerate(drafts):
            lp = target(logits[i], recent)
            out_lps.append(lp)
            replacement = verify_draft(distribution(lp[None])[0], q, d)
            if replacement is not None:
                break
            kept.append(d)
            recent = recent + [d]
        stats.accepted += len(kept) - 1
        if replacement is not None:
            for c, s in zip(cache, snap):
                c.restore(s)
            logits, streams = forward(kept + [replacement])
            kept.append(replacement)
        committed = len(kept)
        drafter.observe(streams[:, : committed - 1], kept[1:])
        row, last = logits[committed - 1], streams[:, committed - 1 : committed]
        mx.eval(row, last, [c.state for c in cache])
        stats.tokens += committed
        tail = (tail + kept)[-PROCESSOR_CONTEXT:]
        handed = 0
        try:
            for token, lp in zip(kept, out_lps):
                handed += 1  # counted before the yield: a consumer that stops has seen it
                n += 1
                yield token, lp
                if n >= max_tokens:
                    break
        finally:
            if handed < committed:
                # The consumer stopped mid-round: leave the cache holding what it saw.
                for c, s in zip(cache, snap):
                    c.restore(s)
                if handed:
                    forward(kept[:handed])
                    mx.eval([c.state for c in cache])
        if n >= max_tokens:
            return
