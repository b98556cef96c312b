"""A conversation's decode state: one cache, the tokens it holds, snapshots for prefix reuse.

Given the next full prompt (the whole conversation re-rendered), the session reuses the longest
prefix it can: the live cache when the prompt extends everything it holds, otherwise the latest
snapshot taken at the end of an earlier prompt that the new prompt still starts with. V4 state
cannot be trimmed (a closed window cannot be reopened), so those are the only ways back. With a
`PromptCache` (prompt_cache.py) it also keeps restore points there (every `interval` tokens of a
prefill, at each prompt's end, and where a cancelled prefill stopped) and, when that holds a
longer prefix than the live cache (another conversation, an edited message, one from before a
restart), restores it into a fresh cache. If nothing applies, it prefills from scratch. Knows
no terminal, no HTTP.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import mlx.core as mx

from ..model.cache import LayerCache, Snapshot, make_cache
from .generate import Chunk, stream_generate
from .prefill import check_request, prefill
from .score import Scored, prompt_logprobs

log = logging.getLogger("mlx_dsv4.generation.session")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    def __init__(self, model, tokenizer, *, max_context: int | None = None,
                 largest_context: int | None = None, kv_bits: int | None = None,
                 prefill_chunk: int = 512, max_snapshots: int = 4, draft: int = 0,
                 prompt_cache=None):
        """`draft`: tokens the MTP block drafts per round (0: no speculation); `prompt_cache`: a
        `prompt_cache.PromptCache` shared by prompts and conversations (None: the live cache only)."""
        self.prompt_cache = prompt_cache
        self.model, self.tokenizer = model, tokenizer
        self.draft = draft
        self.max_context, self.largest_context = max_context, largest_context
        self.kv_bits, self.prefill_chunk, self.max_snapshots = kv_bits, prefill_chunk, max_snapshots
        self.cache: list[LayerCache] | None = None
        self.tokens: list[int] = []  # exactly the tokens the cache has consumed
        self.snapshots: list[tuple[int, list[Snapshot]]] = []
        self.trail = None  # the prompt cache's restore points along this cache

    def reset(self):
        self.cache, self.tokens, self.snapshots, self.trail = None, [], [], None

    def _new(self):
        self.cache = self._fresh()
        self.tokens, self.snapshots = [], []
        self.trail = self.prompt_cache.trail() if self.prompt_cache is not None else None

    def _prepare(self, ids: Sequence[int]) -> int:
        """Put the cache at the longest reusable prefix of `ids`; return its length."""
        if self.cache is None or len({c.offset for c in self.cache}) != 1:
            self._new()
        # At least one token must be fed to get the next token's logits.
        usable = min(common_prefix(self.tokens, ids), len(ids) - 1)
        fitting = [s for s in self.snapshots if s[0] <= usable]
        live = usable if usable == len(self.tokens) else fitting[-1][0] if fitting else 0
        if self.prompt_cache is not None and (n := self._restore(ids, live)) is not None:
            return n
        if usable == len(self.tokens):
            return usable
        if not fitting:
            self._new()
            return 0
        n, snaps = fitting[-1]
        for layer, snap in zip(self.cache, snaps):
            layer.restore(snap)
        # Pools past n will be overwritten by the new branch: later snapshots are void.
        self.snapshots = fitting
        self.tokens = self.tokens[:n]
        if self.trail is not None:
            self.trail.cut(n)
        return n

    def _restore(self, ids: Sequence[int], live: int) -> int | None:
        """Restore the prompt cache's longest prefix of `ids` if it beats `live` tokens."""
        from .prompt_cache import restore

        found = self.prompt_cache.lookup_for(ids, self._fresh, floor=live)
        if found is None:
            return None
        hit, fresh = found
        self.cache = None  # the old pools go before the new ones fill
        restore(fresh, hit.state)
        self.cache, self.tokens, self.snapshots = fresh, list(ids[: hit.n]), []
        self.trail = self.prompt_cache.trail(hit.state)
        self._snapshot()
        log.info("prompt cache: %d of %d prompt tokens restored from %s", hit.n, len(ids), hit.source)
        return hit.n

    def _fresh(self) -> list[LayerCache]:
        return make_cache(self.model, max_tokens=self.max_context, kv_bits=self.kv_bits)

    def _snapshot(self):
        n = len(self.tokens)
        if not self.snapshots or self.snapshots[-1][0] != n:
            self.snapshots.append((n, [c.snapshot() for c in self.cache]))
            self.snapshots = self.snapshots[-self.max_snapshots :]

    def _check(self, ids: Sequence[int], max_tokens: int):
        # Before the cache is touched: a refused request leaves the session as it was.
        check_request(ids, max_tokens, self.model.args.vocab_size, self.max_context,
                      self.largest_context)

    def generate(self, ids: Sequence[int], **kwargs) -> Iterator[Chunk]:
        """`stream_generate` for the full prompt `ids`, reusing what the cache already holds."""
        ids = list(ids)
        if not ids:
            raise ValueError("An empty prompt cannot be continued.")
        kwargs.setdefault("draft", self.draft)
        self._check(ids, kwargs.get("max_tokens", 256))
        reused = self._prepare(ids)
        points = _Points(self, ids)
        generated: list[int] = []
        try:
            for chunk in stream_generate(
                    self.model, self.tokenizer, ids[reused:], cache=self.cache,
                    history=ids[:reused], reused_tokens=reused, max_context=self.max_context,
                    largest_context=self.largest_context, prefill_chunk=self.prefill_chunk,
                    on_prefilled=points.prefilled, on_chunk=points.chunk, **kwargs):
                if chunk.token is not None:
                    generated.append(chunk.token)
                yield chunk
        finally:
            if self.cache is not None:  # reset() while the stream was paused leaves nothing
                points.stopped()
                self.tokens = (ids + generated)[: self.cache[0].offset]

    def prefill(self, ids: Sequence[int]) -> tuple[mx.array, int]:
        """Logits `[V]` after `ids` (reusing the cache) and how many tokens were reused."""
        ids = list(ids)
        self._check(ids, 0)
        reused = self._prepare(ids)
        points = _Points(self, ids)
        try:
            logits = prefill(self.model, ids[reused:], self.cache, self.prefill_chunk,
                             on_prefilled=points.prefilled, on_chunk=points.chunk)
        finally:
            if self.cache is not None:  # stopped early, the cache holds what it was fed
                points.stopped()
                self.tokens = ids[: self.cache[0].offset]
        return logits[0], reused

    def score(self, ids: Sequence[int], top: int = 0) -> Iterator[list[Scored]]:
        """`score.prompt_logprobs` of `ids`, chunk by chunk, in a cache of its own: what this
        session holds is neither used nor changed."""
        return prompt_logprobs(self.model, ids, top, chunk=self.prefill_chunk, kv_bits=self.kv_bits)


class _Points:
    """One prompt's restore points: every `interval` tokens of its prefill (at chunk ends), at
    its end, and where its prefill stopped early (cancelled, or failed between chunks)."""

    def __init__(self, session: Session, ids: list[int]):
        self.session, self.ids = session, ids
        self.start = self.chunk_end = session.cache[0].offset  # the cache is whole here
        self.done = False

    def _keep(self, force: bool):
        s = self.session
        if s.prompt_cache is not None and s.trail is not None:
            n = s.cache[0].offset
            s.prompt_cache.keep(s.trail, self.ids[:n], s.cache, force=force)

    def chunk(self):
        self.chunk_end = self.session.cache[0].offset
        self._keep(force=False)

    def prefilled(self):
        self.done = True
        self.session.tokens = self.ids[:-1]
        self.session._snapshot()
        self._keep(force=True)

    def stopped(self):
        """After the stream ended: if it ended inside the prefill, at a chunk end (the cache
        whole), keep a point there so that a retry resumes from it."""
        whole = {c.offset for c in self.session.cache} == {self.chunk_end}
        if not self.done and self.chunk_end > self.start and whole:
            self._keep(force=True)
