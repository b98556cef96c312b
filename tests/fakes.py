"""Test doubles for the generator: a byte-level tokenizer and a model that says what it is told.

With them the generator's stopping, streaming and stats are tested exactly, with no weights.
"""

from __future__ import annotations

import codecs

import mlx.core as mx
import numpy as np

from mlx_dsv4.config import ModelArgs
from mlx_dsv4.synthetic import tiny_config


class ByteTokenizer:
    """Token id = byte value; id 1 is EOS. UTF-8 characters span several tokens."""

    eos_token_ids = [1]
    bos_token_id = 0
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def detokenizer(self):
        return _ByteStream()


class _ByteStream:
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._dec.decode(bytes([token]))

    def finalize(self) -> str:
        return self._dec.decode(b"", final=True)


class _Cache:
    def __init__(self):
        self.offset = 0
        self.state = []


class ScriptedModel:
    """Emits `script[i]` as the argmax after having consumed the prompt and i generated tokens."""

    args = ModelArgs.from_dict(tiny_config(vocab_size=256, eos_token_id=1))

    def __init__(self, script: list[int], prompt_len: int, vocab: int = 256):
        self.script, self.prompt_len, self.vocab, self.calls = list(script), prompt_len, vocab, 0

    def make_cache(self):
        return [_Cache()]

    def __call__(self, ids, cache, last_only=False):
        self.calls += 1
        S = ids.shape[1]
        cache[0].offset += S
        logits = np.zeros((1, 1 if last_only else S, self.vocab), np.float32)
        step = cache[0].offset - self.prompt_len
        token = self.script[min(step, len(self.script) - 1)]
        logits[0, -1, token] = 30.0
        return mx.array(logits)
