"""Engram (DeepSeek-V4.1, spec §1.6): hashed n-gram memory added to the residual streams.

At an Engram layer, the last 2…n tokens before each position (n = `engram_max_ngram_size`) are
hashed, per n-gram size and per head, to one row each of the layer's table (~384M rows of 256
FP8 values in the release); the rows are projected into one key per stream and a shared value,
and a gate (how well each stream matches its key) adds the value into the streams.

The tables stay on disk. `EngramFile` reads the rows a step needs from the converted file with
`os.pread` (whole rows, deduplicated; the kernel pages them through its file cache, which it
can drop at will), so the process never maps, wires or copies a table: its resident memory does
not grow with the table size. Hashing runs on the host in numpy because the rows must be read
there anyway; that makes an Engram model sync once per forward to learn its token ids.

Owns: the hash (`EngramHash`), the table readers (`EngramFile`; `EngramArray` holds a table in
memory for tests), the module (`Engram`) and the per-sequence token history (`EngramHistory`, a
part of the layer's cache).
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fakequant
from ..config import ConfigError, ModelArgs

TOKEN_MAP = "engram_token_map.json"  # compressed id of every token id, written by the converter
SCALE_GROUP = 32  # one E8M0 scale per 32 FP8 values, as the release stores the tables
READ_THREADS = 8
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: exact for every n below 3.3e24."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=8)
def table_primes(layers: int, ngrams: int, heads: int, vocab: int) -> tuple:
    """Bucket count of each (Engram layer, n-gram size, head): primes above `vocab` - 1, drawn in
    that order and never reused, so every bucket range of a table is its own."""
    out, current = [], vocab - 1
    for _ in range(layers):
        layer = []
        for _ in range(ngrams):
            heads_ = []
            for _ in range(heads):
                current += 1
                while not is_prime(current):
                    current += 1
                heads_.append(current)
            layer.append(tuple(heads_))
        out.append(tuple(layer))
    return tuple(out)


class EngramHash:
    """Row ids of every position: `ids(slot, tokens)` for the Engram layer at `slot`.

    Token ids first go through the compressed map (ids whose text normalizes alike share one);
    each position's n-grams are hashed from per-layer odd multipliers, XOR-folded over the
    look-back, modulo each head's prime, offset into that head's bucket range.
    """

    def __init__(self, args: ModelArgs, token_map: np.ndarray):
        token_map = np.asarray(token_map, np.int64)
        n_compressed = int(token_map.max()) + 1 if token_map.size else 0
        if n_compressed != args.engram_compressed_vocab_size or len(token_map) <= args.engram_pad_token_id:
            raise ConfigError(
                f"The Engram token map has {len(token_map)} ids in {n_compressed} classes; the "
                f"config needs {args.engram_compressed_vocab_size} classes.")
        self.pad = int(token_map[args.engram_pad_token_id])
        if len(token_map) < args.vocab_size:  # ids past the tokenizer's (padding): never fed
            token_map = np.concatenate([token_map, np.full(args.vocab_size - len(token_map), self.pad)])
        self.map, self.n = token_map, args.engram_max_ngram_size
        primes = table_primes(len(args.engram_layer_ids), self.n - 1, args.engram_n_heads,
                              args.engram_vocab_size)
        bound = np.iinfo(np.int64).max // n_compressed // 2  # token * multiplier fits int64
        self.multipliers, self.primes, self.offsets = [], [], []
        for layer, rows, p in zip(args.engram_layer_ids, args.engram_num_embeddings, primes):
            if sum(map(sum, p)) != rows:
                raise ConfigError(f"Engram layer {layer}: its buckets need {sum(map(sum, p)):,} "
                                  f"rows, the config gives its table {rows:,}.")
            draw = np.random.default_rng(10007 * layer).integers(0, bound, self.n, dtype=np.int64)
            self.multipliers.append(draw * 2 + 1)
            flat = np.array([q for per_ngram in p for q in per_ngram], np.int64)
            self.primes.append(np.array(p, np.int64))
            self.offsets.append(np.concatenate([[0], np.cumsum(flat)[:-1]]))

    def ids(self, slot: int, tokens: np.ndarray) -> np.ndarray:
        """Row ids `[B, S, (n-1) * heads]` of the last S positions of `tokens [B, n-1+S]` (token
        ids, -1 before the sequence start, which hashes as the pad token)."""
        S = tokens.shape[1] - (self.n - 1)
        comp = np.where(tokens >= 0, self.map[np.maximum(tokens, 0)], self.pad)
        mult = self.multipliers[slot]
        rolling = comp[:, self.n - 1 :] * mult[0]
        cols = []
        for k in range(1, self.n):  # fold in the token k back: the (k+1)-gram
            rolling = rolling ^ (comp[:, self.n - 1 - k : self.n - 1 - k + S] * mult[k])
            cols.append(rolling[..., None] % self.primes[slot][k - 1])
        return np.concatenate(cols, axis=-1) + self.offsets[slot]


def table_file(layer: int) -> str:
    """Where a converted directory keeps layer `layer`'s table (outside the weight shards)."""
    return f"engram/layers.{layer}.safetensors"


def load_token_map(path: str | Path) -> np.ndarray:
    path = Path(path) / TOKEN_MAP
    if not path.exists():
        raise ConfigError(f"{path.parent} has no {TOKEN_MAP}: this V4.1 model's Engram layers "
                          "need it (dsv4 convert writes it).")
    return np.asarray(json.loads(path.read_text()), np.int64)


class EngramArray:
    """A table held in memory `[rows, head_dim]` (tests and tiny models)."""

    def __init__(self, table: mx.array):
        self.table = table

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    def lookup(self, ids: np.ndarray) -> mx.array:
        return self.table[mx.array(ids)]


class EngramFile:
    """One converted table: a safetensors file holding `[rows, head_dim + head_dim / 32]` bytes,
    each row its FP8 e4m3 codes then their E8M0 scales (the release's bytes, interleaved so a
    row is one read). Rows are read with `pread` and dequantized as mxfp8, exactly."""

    def __init__(self, path: str | Path, head_dim: int):
        self.path, self.head_dim = Path(path), head_dim
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        if len(header) != 1:
            raise ValueError(f"{self.path} should hold one Engram table, it holds {len(header)} tensors.")
        (entry,) = header.values()
        self.rows, self.row_bytes = entry["shape"]
        if entry["dtype"] != "U8" or self.row_bytes != head_dim + head_dim // SCALE_GROUP:
            raise ValueError(f"{self.path}: rows of {self.row_bytes} {entry['dtype']} bytes, "
                             f"expected {head_dim + head_dim // SCALE_GROUP} U8 (head_dim {head_dim}).")
        self.start = 8 + n + entry["data_offsets"][0]
        if self.path.stat().st_size < self.start + self.rows * self.row_bytes:
            raise ValueError(f"{self.path} is truncated: convert it again.")
        self.fd = os.open(self.path, os.O_RDONLY)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._pool is not None:
            self._pool.shutdown()

    def __del__(self):
        self.close()

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Raw rows `[len(ids), row_bytes]` uint8 of `ids` (1-D)."""
        out = np.empty((len(ids), self.row_bytes), np.uint8)
        size, start, fd = self.row_bytes, self.start, self.fd

        def run(lo: int, hi: int):
            for i in range(lo, hi):
                out[i] = np.frombuffer(os.pread(fd, size, start + int(ids[i]) * size), np.uint8)

        if len(ids) <= 256:
            run(0, len(ids))
        else:  # a prefill chunk: reads in flight together (pread releases the GIL)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dsv4-engram")
            step = -(-len(ids) // READ_THREADS)
            list(self._pool.map(lambda lo: run(lo, min(lo + step, len(ids))), range(0, len(ids), step)))
        return out

    def lookup(self, ids: np.ndarray) -> mx.array:
        """Rows of `ids` (any shape) as bf16 `[*ids.shape, head_dim]`; each row is read once."""
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= self.rows):
            raise ValueError(f"Engram row {unique[-1]} is outside {self.path}'s {self.rows} rows.")
        raw = self.read(unique)
        hd = self.head_dim
        codes = mx.array(np.ascontiguousarray(raw[:, :hd])).view(mx.uint32)
        scales = mx.array(np.ascontiguousarray(raw[:, hd:]))
        rows = mx.dequantize(codes, scales, group_size=SCALE_GROUP, bits=8, mode="mxfp8",
                             dtype=mx.bfloat16)
        return rows[mx.array(inverse.reshape(ids.shape))]


class EngramHistory:
    """The last n-1 token ids a sequence has fed (-1 before its start): the look-back of the
    next positions' n-grams. Replaced, never written in place, so a snapshot is a reference."""

    def __init__(self, batch: int, n: int):
        self.tokens = mx.full((batch, max(n - 1, 0)), -1, mx.int32)

    def arrays(self) -> dict[str, mx.array]:
        return {"tokens": self.tokens}

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes


@lru_cache(maxsize=None)
def _gate_fn(eps: float, scale: float):
    def gate(X, key, value, wq, wk):
        h, k = X.astype(mx.float32), key.astype(mx.float32)
        w = wq.astype(mx.float32) * wk.astype(mx.float32)
        r = mx.rsqrt(mx.mean(h * h, axis=-1) + eps) * mx.rsqrt(mx.mean(k * k, axis=-1) + eps)
        dot = (h * w * k).sum(axis=-1) * r * scale
        # A signed square root of the normalized match, kept away from zero.
        mag = mx.sqrt(mx.maximum(mx.abs(dot), 1e-6))
        g = mx.sigmoid(mx.where(dot >= 0, mag, -mag))
        return (h + g[..., None] * value.astype(mx.float32)[..., None, :]).astype(X.dtype)

    return mx.compile(gate, shapeless=True)


class Engram(nn.Module):
    """One layer's Engram: rows `[B, S, cols, head_dim]` -> keys (one per stream) and a value
    -> the gated value added to the streams `[B, S, N, D]`. `table` (set by the loader) is a
    plain attribute, not a parameter: it is never part of the model's weights."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        N, D = args.hc_mult, args.hidden_size
        self.slot = args.engram_layer_ids.index(layer)
        self.n, self.dims = args.engram_max_ngram_size, (N, D)
        self.wkv = nn.Linear(args.engram_hash_columns * args.engram_head_dim, (N + 1) * D, bias=False)
        self.q_weight = mx.ones((N, D))
        self.k_weight = mx.ones((N, D))
        self._gate = _gate_fn(args.rms_norm_eps, D**-0.5)
        self.table = None

    def __call__(self, X: mx.array, rows: mx.array) -> mx.array:
        B, S = X.shape[:2]
        N, D = self.dims
        kv = self.wkv(fakequant.linear_input(rows.astype(X.dtype).reshape(B, S, -1)))
        key = kv[..., : N * D].reshape(B, S, N, D)
        return self._gate(X, key, kv[..., N * D :], self.q_weight, self.k_weight)


def fetch(engrams: list[tuple[Engram, EngramHistory]], hasher: EngramHash, ids: np.ndarray) -> list:
    """The rows each Engram layer reads for token ids `ids [B, S]` (host), advancing each
    layer's history past them."""
    out = []
    for module, history in engrams:
        past = np.array(history.tokens, np.int64)
        tokens = np.concatenate([past, ids.astype(np.int64)], axis=1)
        out.append(module.table.lookup(hasher.ids(module.slot, tokens)))
        history.tokens = mx.array(tokens[:, tokens.shape[1] - past.shape[1] :].astype(np.int32))
    return out


def engram_rows(model, layers, ids: mx.array, cache: list) -> dict[int, mx.array]:
    """Per Engram layer among `layers` (whose caches `cache` holds, in order), the table rows of
    `ids`: a host sync, since rows are read on the host (model.engram_hash hashes them)."""
    pairs = [(i, model.layers[i].engram, c.engram) for i, c in zip(layers, cache)
             if "engram" in model.layers[i]]
    if not pairs:
        return {}
    if model.engram_hash is None:
        raise ValueError("This V4.1 model has Engram layers but no Engram hash: load it with "
                         "weights.load_model, which reads its token map and tables.")
    rows = fetch([(m, h) for _, m, h in pairs], model.engram_hash, np.array(ids))
    return {i: r for (i, _, _), r in zip(pairs, rows)}
