"""DeepSeek-V4 tokenizer on `tokenizers` alone: text <-> ids, streaming decode (protocol A1, A2, A13).

`tokenizers` matches every added token anywhere in the text, as DeepSeek's reference does. Message
text must not get that treatment (A13): `<｜User｜>` or `<｜end▁of▁sentence｜>` typed by a user stays
text. `tokenizers`' `encode_special_tokens` switch covers only the few tokens flagged special, not
the chat tokens, so plain encoding runs the pre-tokenizer and BPE model directly when the text
holds an added-token string. `encode_segments` combines both for `chat_format.render_segments`
output. Knows no chat format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"


class Detokenizer:
    """Streaming decode: `add(id)` returns the newly complete text ("" while a UTF-8 character
    is still split), `finalize()` what is left (an unfinished character as U+FFFD)."""

    def __init__(self, tok: tokenizers.Tokenizer, skip_special_tokens: bool = False):
        self._tok, self._skip = tok, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids added since the last text came out

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._stream.step(self._tok, token_id)
        if text:
            self._pending = []
        return text or ""

    def finalize(self) -> str:
        # Byte-level decoding needs no left context, so the held ids decode on their own.
        text = self._tok.decode(self._pending, skip_special_tokens=self._skip) if self._pending else ""
        self._pending = []
        self._stream = DecodeStream(skip_special_tokens=self._skip)
        return text


def _token_content(value) -> str | None:
    """A token in tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be parsed; the message names it."""


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str = DEFAULT_BOS,
                 eos_token: str = DEFAULT_EOS, extra_eos_ids: Iterable[int] = ()):
        self._tok = tok
        self._added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        # Leftmost-longest, the way `tokenizers` matches added tokens.
        longest_first = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in longest_first))
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tok.token_to_id(bos_token)
        self.eos_token_id = tok.token_to_id(eos_token)
        ids = [self.eos_token_id] + [i for i in extra_eos_ids if i != self.eos_token_id]
        self.eos_token_ids = [i for i in ids if i is not None]

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> Tokenizer:
        if not Path(path).is_file():
            raise TokenizerError(f"{path}: no tokenizer file (the model directory needs "
                                 "tokenizer.json).")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise TokenizerError(f"{path} is not a readable tokenizer: {e}") from e
        return cls(tok, **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """`tokenizer.json`, with BOS/EOS from `tokenizer_config.json` and extra stop ids from
        `generation_config.json` when present."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        kwargs = {k: _token_content(config[k]) for k in ("bos_token", "eos_token") if config.get(k)}
        eos = _read_json(model_dir / "generation_config.json").get("eos_token_id", [])
        kwargs["extra_eos_ids"] = [eos] if isinstance(eos, int) else eos
        return cls.from_file(model_dir / "tokenizer.json", **kwargs)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` underneath (grammar engines build their view from it)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, *, allow_control: bool = False) -> list[int]:
        """Ids of `text` without BOS. Added-token strings in it become their ids only with
        `allow_control` (raw prompts, FIM); otherwise they are tokenized as plain text.
        Lone surrogates (undecodable bytes as Python decodes them) become U+FFFD: the Rust
        tokenizer refuses them with a TypeError."""
        text = _SURROGATE.sub("\ufffd", text)
        if allow_control or not self._added_re.search(text):
            return self._tok.encode(text, add_special_tokens=False).ids
        # What `tokenizers` does between added tokens, applied to the whole text.
        tok, ids = self._tok, []
        text = tok.normalizer.normalize_str(text) if tok.normalizer else text
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer else [(text, None)]
        for piece, _ in pieces:
            ids.extend(t.id for t in tok.model.tokenize(piece))
        return ids

    def encode_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Ids of `render_segments` output: added tokens are matched in template pieces only.

        Text between two matched tokens is encoded in one piece, whatever segments it spans, so
        a prompt whose message texts hold no control strings gets exactly the reference ids."""
        ids: list[int] = []
        pending: list[str] = []

        def flush():
            if pending:
                ids.extend(self.encode("".join(pending)))
                pending.clear()

        for text, plain in _merge_templates(segments):
            if plain:
                pending.append(text)
                continue
            pos = 0
            for m in self._added_re.finditer(text):
                pending.append(text[pos: m.start()])
                flush()
                ids.append(self._added[m.group()])
                pos = m.end()
            pending.append(text[pos:])
        flush()
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, *, skip_special_tokens: bool = False) -> Detokenizer:
        return Detokenizer(self._tok, skip_special_tokens)


def _merge_templates(segments: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring template pieces, so a control token split over two still matches."""
    out: list[tuple[str, bool]] = []
    for text, plain in segments:
        if out and not plain and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, plain))
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
