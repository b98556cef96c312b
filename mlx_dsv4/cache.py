"""Decode state of one sequence batch: the per-layer pools of spec §3.1.

Every layer keeps a ring of the last `sliding_window` post-RoPE KV rows. CSA and HCA layers add
the compressor's partial-window rows (and, for CSA's overlapping windows, the carry half of the
last complete window) and an append-only pool of compressed entries; CSA layers also keep the
indexer's compressor state and its pool of index keys.

Updates never mutate an array another object may hold: each one rebinds the attribute to the
result of `mx.slice_update`, which MLX performs in place when nothing else references the old
buffer. So a snapshot is a dict of the current arrays (O(1)), and restoring it is exact. V4 state
cannot be trimmed: a closed window's entry cannot be reopened, so rollback means restoring a
snapshot, never truncating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .config import CSA, SLIDING, ModelArgs

# Pools grow by at least this many entries (and by half their size) when full.
GROW_ENTRIES = 256


def _write(buf: mx.array, rows: mx.array, start: int) -> mx.array:
    return mx.slice_update(buf, rows, mx.array([start], mx.int32), axes=(1,))


class WindowRing:
    """Post-RoPE KV of the last `W` positions; position p lives in slot p mod W."""

    def __init__(self, batch: int, window: int, dim: int, dtype: mx.Dtype):
        self.window = window
        self.keys = mx.zeros((batch, window, dim), dtype)

    def ordered(self, offset: int) -> mx.array:
        """Rows of positions offset-W … offset-1 in position order (negative ones are garbage)."""
        W = self.window
        start = offset % W
        if start == 0:
            return self.keys
        return mx.concatenate([self.keys[:, start:], self.keys[:, :start]], axis=1)

    def write(self, kv: mx.array, offset: int):
        """Store the rows of positions offset … offset+S-1 (only the last W survive)."""
        W, S = self.window, kv.shape[1]
        if S >= W:
            kv, offset = kv[:, S - W :], offset + S - W
            S = W
        start = offset % W
        first = min(S, W - start)
        self.keys = _write(self.keys, kv[:, :first], start)
        if first < S:
            self.keys = _write(self.keys, kv[:, first:], 0)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes


class CompressorState:
    """Rows of the current partial window, P and G+ape in fp32, at row p mod m.

    With overlapping windows (CSA) it also keeps the carry half (`[:width]` features) of the
    last complete window, which the next window's entry pools over. Gates start at -inf so an
    absent row or carry gets zero softmax weight.
    """

    def __init__(self, batch: int, ratio: int, width: int, overlap: bool):
        self.ratio, self.width, self.overlap = ratio, width, overlap
        k = 2 if overlap else 1
        self.kv = mx.zeros((batch, ratio, k * width), mx.float32)
        self.gate = mx.full((batch, ratio, k * width), -mx.inf, mx.float32)
        if overlap:
            self.carry_kv = mx.zeros((batch, ratio, width), mx.float32)
            self.carry_gate = mx.full((batch, ratio, width), -mx.inf, mx.float32)

    def arrays(self) -> dict[str, mx.array]:
        names = ("kv", "gate", "carry_kv", "carry_gate") if self.overlap else ("kv", "gate")
        return {n: getattr(self, n) for n in names}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


class EntryPool:
    """Append-only compressed entries `[B, n, width]`, preallocated and grown in large steps."""

    def __init__(self, batch: int, width: int, dtype: mx.Dtype, capacity: int = 0):
        self.n = 0
        self.data = mx.zeros((batch, capacity, width), dtype)

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    def append(self, entries: mx.array):
        k = entries.shape[1]
        if k == 0:
            return
        if self.n + k > self.capacity:
            grow = max(GROW_ENTRIES, self.capacity // 2, self.n + k - self.capacity)
            B, _, w = self.data.shape
            # Growth copies once per step, never per token.
            self.data = mx.concatenate([self.data, mx.zeros((B, grow, w), self.data.dtype)], axis=1)
        self.data = _write(self.data, entries.astype(self.data.dtype), self.n)
        self.n += k

    def view(self) -> mx.array:
        return self.data[:, : self.n]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class Snapshot:
    """Arrays and counters of one LayerCache at one point; restoring it is exact."""

    offset: int
    arrays: dict[str, mx.array]
    counts: dict[str, int]


class LayerCache:
    """All decode state of one layer (spec §3.1) for a batch of sequences at the same offset."""

    def __init__(self, args: ModelArgs, layer: int, batch: int = 1, dtype: mx.Dtype = mx.bfloat16,
                 max_tokens: int | None = None):
        self.kind = args.attention_kind(layer)
        self.ratio = args.compress_ratio(layer)
        self.offset = 0
        self.window = WindowRing(batch, args.sliding_window, args.head_dim, dtype)
        self.compressor = self.kv_pool = self.indexer = self.index_pool = None
        if self.kind == SLIDING:
            return
        cap = math.ceil(max_tokens / self.ratio) if max_tokens else 0
        overlap = self.kind == CSA
        self.compressor = CompressorState(batch, self.ratio, args.head_dim, overlap)
        self.kv_pool = EntryPool(batch, args.head_dim, dtype, cap)
        if self.kind == CSA:
            self.indexer = CompressorState(batch, self.ratio, args.index_head_dim, overlap)
            self.index_pool = EntryPool(batch, args.index_head_dim, dtype, cap)

    def _parts(self):
        yield "window", self.window
        for name in ("compressor", "kv_pool", "indexer", "index_pool"):
            part = getattr(self, name)
            if part is not None:
                yield name, part

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for _, part in self._parts())

    def snapshot(self) -> Snapshot:
        arrays, counts = {}, {}
        for name, part in self._parts():
            if isinstance(part, WindowRing):
                arrays[f"{name}.keys"] = part.keys
            elif isinstance(part, EntryPool):
                arrays[f"{name}.data"] = part.data
                counts[name] = part.n
            else:
                arrays.update({f"{name}.{k}": v for k, v in part.arrays().items()})
        return Snapshot(self.offset, arrays, counts)

    def restore(self, snap: Snapshot):
        self.offset = snap.offset
        for key, value in snap.arrays.items():
            name, attr = key.split(".")
            setattr(getattr(self, name), attr, value)
        for name, n in snap.counts.items():
            getattr(self, name).n = n

    @property
    def state(self) -> list[mx.array]:
        """Every array of this cache (for `mx.eval`)."""
        return list(self.snapshot().arrays.values())


def make_cache(model_or_args, batch: int = 1, dtype: mx.Dtype | None = None,
               max_tokens: int | None = None, mtp: bool = False) -> list[LayerCache]:
    """One LayerCache per trunk layer (or per MTP block with `mtp=True`).

    `max_tokens` preallocates the compressed pools for that many tokens; without it they grow.
    """
    args = getattr(model_or_args, "args", model_or_args)
    if dtype is None:
        dtype = getattr(model_or_args, "dtype", mx.bfloat16)
    if mtp:
        layers = range(args.num_hidden_layers, args.num_hidden_layers + args.num_nextn_predict_layers)
    else:
        layers = range(args.num_hidden_layers)
    return [LayerCache(args, i, batch, dtype, max_tokens) for i in layers]
