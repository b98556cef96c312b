"""Grammar-constrained sampling: an llguidance matcher applied as a logits processor.

`Constraint` is a `fn(recent_tokens, logits) -> logits` processor (the shape `generate_step`
takes) that lets through only tokens the grammar allows next. It can wait behind a `gate` (a
callable told each generated token, True once the constraint should start, e.g. at `</think>`)
so that what comes before is never constrained. The grammar text (Lark, with `%json` schemas) is
the caller's; this module knows tokens and grammars, not chat formats or HTTP.

The mask is computed on the CPU while the device runs the forward pass that needs it: the
processor queues the logits with `mx.async_eval` before it reads the previous token and asks the
matcher. `Constraint.mask_seconds` keeps the time spent per mask (matcher plus conversion).
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

log = logging.getLogger("mlx_dsv4.generation.constrain")
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile; the message is llguidance's reason."""


def grammar_tokenizer(tokenizer, vocab_size: int | None = None):
    """llguidance's view of `tokenizer` (a `tokenizer.Tokenizer`), built once per tokenizer
    (about a second at V4's 129K vocabulary)."""
    import llguidance

    cached = _TOKENIZERS.get(tokenizer)
    if cached is None or (vocab_size and cached.vocab_size != vocab_size):
        backend = getattr(tokenizer, "backend", tokenizer)
        cached = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                        eos_token=list(getattr(tokenizer, "eos_token_ids", [])) or None)
        _TOKENIZERS[tokenizer] = cached
    return cached


def lark(grammar: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(grammar)


# Whitespace between JSON tokens: a line break and an indent at most, so that pretty-printing
# works but a sampler cannot spend the whole budget on blank space.
JSON_WHITESPACE = r"(\x0D?\x0A)?[\x20\x09]{0,40}"


def json_schema(schema: dict) -> str:
    """A grammar for JSON that validates against `schema`."""
    import llguidance

    options = {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except ValueError as e:
        raise GrammarError(str(e)) from e


def check(grammar: str, ll_tokenizer) -> None:
    """Raise `GrammarError` with llguidance's reason when `grammar` does not compile."""
    import llguidance

    if error := llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer):
        raise GrammarError(error.strip())


@functools.lru_cache(maxsize=32)
def _matcher(ll_tokenizer, grammar: str):
    """A fresh matcher for `grammar`, to be copied: building one from a large tool list takes
    ~15 ms, a copy ~10 µs, and agents send the same tools with every request."""
    import llguidance

    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return matcher


class Constraint:
    """Mask every token the grammar does not allow next; one instance per generation.

    `gate(token) -> bool` is told each generated token while the constraint waits and turns
    it on from the next token when it returns True; without a gate it is on from the first.
    Once the grammar is complete only the tokenizer's EOS is allowed. It must be called once per
    generated token, in order (`sequential`): `stream_generate` does not decode speculatively
    with it."""

    sequential = True

    def __init__(self, ll_tokenizer, grammar: str, *, gate: Callable[[int], bool] | None = None):
        self.matcher = _matcher(ll_tokenizer, grammar).deep_copy()
        self.vocab = ll_tokenizer.vocab_size
        self.eos = list(ll_tokenizer.eos_tokens)
        self.gate, self.active = gate, gate is None
        self.bits = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        self.started = False  # a token has been sampled under this processor
        self.mask_seconds: list[float] = []

    def prime(self, ids: Sequence[int]) -> None:
        """Feed tokens written for the model (a forced opener) through the grammar; turns it on."""
        self.active = True
        if ids and not self.matcher.consume_tokens(list(ids)):
            raise GrammarError(f"the forced text does not fit the grammar: {self.matcher.get_error()}")

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the forward runs while the mask is computed below
        if self.started:
            self._see(int(tokens[-1].item()))
        self.started = True
        return self.apply(logits) if self.active else logits

    def _see(self, token: int) -> None:
        if self.active:
            if not self.matcher.consume_token(token):
                log.warning("the constraint rejected token %d: %s", token, self.matcher.get_error())
        elif self.gate is not None and self.gate(token):
            self.active = True

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a bool vector over the vocabulary."""
        if self.matcher.is_error():
            allowed = np.zeros(self.vocab, dtype=bool)
            allowed[self.eos] = True  # a broken grammar ends the reply rather than run free
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab].view(bool)
        if not allowed.any():  # a dead end: end the reply rather than sample from nothing
            allowed[self.eos] = True
        return allowed

    def apply(self, logits: mx.array) -> mx.array:
        start = time.perf_counter()
        allowed = mx.array(self.allowed())
        self.mask_seconds.append(time.perf_counter() - start)
        V = logits.shape[-1]
        if V > self.vocab:  # rows past the tokenizer's vocabulary are never allowed
            allowed = mx.concatenate([allowed, mx.zeros(V - self.vocab, dtype=mx.bool_)])
        return mx.where(allowed[:V], logits, mx.array(-mx.inf, logits.dtype))

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()
