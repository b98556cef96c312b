"""A conversation's decode state: one cache, the tokens it holds, snapshots for prefix reuse.

Given the next full prompt (the whole conversation re-rendered), the session reuses the longest
prefix it can: the live cache when the prompt extends everything it holds, otherwise the latest
snapshot taken at the end of an earlier prompt that the new prompt still starts with. V4 state
cannot be trimmed (a closed window cannot be reopened), so those are the only ways back. With a
`PromptCache` (prompt_cache.py) it also keeps each prompt's state there and, when that holds a
longer prefix than the live cache (another conversation, or one from before a restart), restores
it into a fresh cache. If nothing applies, it prefills from scratch. Knows no terminal, no HTTP.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import mlx.core as mx

from ..model.cache import LayerCache, Snapshot, make_cache
from .generate import Chunk, check_request, prefill, stream_generate

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

    def reset(self):
        self.cache, self.tokens, self.snapshots = None, [], []

    def _prepare(self, ids: Sequence[int]) -> int:
        """Put the cache at the longest reusable prefix of `ids`; return its length."""
        if self.cache is None or len({c.offset for c in self.cache}) != 1:
            self.cache = self._fresh()
            self.tokens, self.snapshots = [], []
        # At least one token must be fed to get the next token's logits.
        usable = min(common_prefix(self.tokens, ids), len(ids) - 1)
        fitting = [s for s in self.snapshots if s[0] <= usable]
        live = usable if usable == len(self.tokens) else fitting[-1][0] if fitting else 0
        if self.prompt_cache is not None and (n := self._restore(ids, live)) is not None:
            return n
        if usable == len(self.tokens):
            return usable
        if not fitting:
            self.cache = self._fresh()
            self.tokens, self.snapshots = [], []
            return 0
        n, snaps = fitting[-1]
        for layer, snap in zip(self.cache, snaps):
            layer.restore(snap)
        # Pools past n will be overwritten by the new branch: later snapshots are void.
        self.snapshots = fitting
        self.tokens = self.tokens[:n]
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
        self._snapshot()
        log.info("prompt cache: %d of %d prompt tokens restored from %s", hit.n, len(ids), hit.source)
        return hit.n

    def _fresh(self) -> list[LayerCache]:
        return make_cache(self.model, max_tokens=self.max_context, kv_bits=self.kv_bits)

    def _remember(self):
        """Snapshot the prompt boundary, and keep its state in the prompt cache."""
        self._snapshot()
        if self.prompt_cache is not None:
            self.prompt_cache.store(self.tokens, self.cache)

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
        generated: list[int] = []

        def on_prefilled():
            self.tokens = ids[:-1]
            self._remember()

        try:
            for chunk in stream_generate(
                    self.model, self.tokenizer, ids[reused:], cache=self.cache,
                    history=ids[:reused], reused_tokens=reused, max_context=self.max_context,
                    largest_context=self.largest_context, prefill_chunk=self.prefill_chunk,
                    on_prefilled=on_prefilled, **kwargs):
                if chunk.token is not None:
                    generated.append(chunk.token)
                yield chunk
        finally:
            if self.cache is not None:  # reset() while the stream was paused leaves nothing
                self.tokens = (ids + generated)[: self.cache[0].offset]

    def prefill(self, ids: Sequence[int]) -> tuple[mx.array, int]:
        """Logits `[V]` after `ids` (reusing the cache) and how many tokens were reused."""
        ids = list(ids)
        self._check(ids, 0)
        reused = self._prepare(ids)

        def on_prefilled():
            self.tokens = ids[:-1]
            self._remember()

        logits = prefill(self.model, ids[reused:], self.cache, self.prefill_chunk,
                         on_prefilled=on_prefilled)
        self.tokens = ids
        return logits[0], reused
