"""Decode state of one sequence batch: the per-layer pools of spec §3.1.

Every layer keeps a ring of the last `sliding_window` post-RoPE KV rows. CSA and HCA layers add
the compressor's partial-window rows (and, for CSA's overlapping windows, the carry half of the
last complete window) and an append-only pool of compressed entries; CSA layers also keep the
indexer's compressor state and its pool of index keys.

V4.1 (spec §1.6): only the layers that own a pool (`kv_source_layer_ids`) keep compressor rows
and pools, read by the later layers of the same ratio; every other layer keeps its ring alone.
Index keys come from the owner's entries, so there is no indexer compressor; Engram layers keep
the last few token ids (`engram.EngramHistory`).

Updates never mutate an array another object may hold: each one rebinds the attribute to the
result of `mx.slice_update`, which MLX performs in place when nothing else references the old
buffer. A snapshot keeps references to the small arrays (ring, compressor rows) and only the
counts of the append-only pools, so it costs O(1) and never doubles a pool. V4 state cannot be
trimmed in general (a closed window's entry cannot be reopened): going back means restoring a
snapshot taken at that point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from ..config import CSA, SLIDING, ModelArgs
from .engram import EngramHistory

# Pools grow by at least this many entries (and by half their size) when full.
GROW_ENTRIES = 256
QUANT_GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}


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
    """Append-only compressed entries `[B, n, width]`, preallocated and grown in large steps.

    With `bits=8` entries are stored as affine 8-bit groups (half the bytes of bf16) and
    dequantized when read. Entries below `n` are never rewritten, so a snapshot of a pool is its
    count alone, and restoring one is setting `n` back.
    """

    def __init__(self, batch: int, width: int, dtype: mx.Dtype, capacity: int = 0,
                 bits: int | None = None, mode: str = "affine"):
        self.n, self.width, self.dtype, self.bits, self.mode = 0, width, dtype, bits, mode
        if bits is None:
            self.arrays = {"data": mx.zeros((batch, capacity, width), dtype)}
        else:
            # V4.1's FP4 pools (mode mxfp4 / nvfp4) are the official inference's own formats.
            self.group = min(64, width) if mode == "affine" else QUANT_GROUP[mode]
            parts = mx.quantize(mx.zeros((batch, 1, width), dtype), self.group, bits, mode=mode)
            self.arrays = {k: mx.zeros((batch, capacity, a.shape[-1]), a.dtype)
                           for k, a in zip(("data", "scales", "biases"), parts)}

    @property
    def capacity(self) -> int:
        return self.arrays["data"].shape[1]

    def reserve(self, k: int):
        """Make room for `k` more entries; growth copies once per step, never per token."""
        if self.n + k > self.capacity:
            grow = max(GROW_ENTRIES, self.capacity // 2, self.n + k - self.capacity)
            self.arrays = {name: mx.concatenate(
                [a, mx.zeros((a.shape[0], grow, a.shape[2]), a.dtype)], axis=1)
                for name, a in self.arrays.items()}

    def append(self, entries: mx.array):
        k = entries.shape[1]
        if k == 0:
            return
        self.reserve(k)
        if self.bits is None:
            parts = {"data": entries.astype(self.dtype)}
        else:
            parts = dict(zip(("data", "scales", "biases"),
                             mx.quantize(entries.astype(self.dtype), self.group, self.bits, mode=self.mode)))
        self.arrays = {name: _write(a, parts[name], self.n) for name, a in self.arrays.items()}
        self.n += k

    def _decode(self, parts: dict[str, mx.array], dtype: mx.Dtype) -> mx.array:
        if self.bits is None:
            return parts["data"].astype(dtype)
        out = mx.dequantize(parts["data"], parts["scales"], parts.get("biases"), self.group,
                            self.bits, mode=self.mode)
        return out.astype(dtype)

    def keys(self, dtype: mx.Dtype) -> mx.array:
        """All entries so far, `[B, n, width]` in `dtype`."""
        return self._decode({k: a[:, : self.n] for k, a in self.arrays.items()}, dtype)

    def gather(self, idx: mx.array, dtype: mx.Dtype) -> mx.array:
        """Entries `idx [B, S, K]` per query: `[B, S, K, width]` (only those rows are decoded)."""
        B, S, K = idx.shape
        ix = idx.reshape(B, S, K, 1)
        return self._decode({k: mx.take_along_axis(a[:, None], ix, axis=2)
                             for k, a in self.arrays.items()}, dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@dataclass
class Snapshot:
    """One LayerCache at one point: window and compressor arrays, pool counts.

    Pools are append-only, so their count suffices while the cache keeps appending to the same
    pool arrays; a snapshot is only valid for the cache it was taken from.
    """

    offset: int
    arrays: dict[str, mx.array]
    counts: dict[str, int]


class LayerCache:
    """All decode state of one layer (spec §3.1) for a batch of sequences at the same offset."""

    def __init__(self, args: ModelArgs, layer: int, batch: int = 1, dtype: mx.Dtype = mx.bfloat16,
                 max_tokens: int | None = None, kv_bits: int | None = None):
        self.kind = args.attention_kind(layer)
        self.ratio = args.compress_ratio(layer)
        self.offset = 0
        self.window = WindowRing(batch, args.sliding_window, args.head_dim, dtype)
        self.compressor = self.kv_pool = self.indexer = self.index_pool = self.engram = None
        if args.is_v41:
            self._v41(args, layer, batch, dtype, max_tokens, kv_bits)
            return
        if self.kind == SLIDING:
            return
        cap = math.ceil(max_tokens / self.ratio) if max_tokens else 0
        overlap = self.kind == CSA
        self.compressor = CompressorState(batch, self.ratio, args.head_dim, overlap)
        self.kv_pool = EntryPool(batch, args.head_dim, dtype, cap, kv_bits)
        if self.kind == CSA:
            self.indexer = CompressorState(batch, self.ratio, args.index_head_dim, overlap)
            self.index_pool = EntryPool(batch, args.index_head_dim, dtype, cap, kv_bits)

    def _v41(self, args: ModelArgs, layer: int, batch: int, dtype, max_tokens, kv_bits):
        """A V4.1 layer: pools only on the layer that owns them (the others read them)."""
        if args.is_engram_layer(layer):
            self.engram = EngramHistory(batch, args.engram_max_ngram_size)
        if not args.owns_pool(layer):
            return
        cap = math.ceil(max_tokens / self.ratio) if max_tokens else 0
        if self.ratio > 1:  # a ratio-1 entry is its own token: nothing waits to be pooled
            self.compressor = CompressorState(batch, self.ratio, args.head_dim, False)
        # kv_bits=4: the official inference's formats, FP4 entries with e4m3 scales per 16 and
        # FP4 index keys with power-of-two scales per 32; what the default fake-quant rounds
        # to, so storing them so loses nothing more.
        modes = ("nvfp4", "mxfp4") if kv_bits == 4 else ("affine", "affine")
        self.kv_pool = EntryPool(batch, args.head_dim, dtype, cap, kv_bits, modes[0])
        self.index_pool = EntryPool(batch, args.index_head_dim, dtype, cap, kv_bits, modes[1])

    def _parts(self):
        yield "window", self.window
        for name in ("compressor", "kv_pool", "indexer", "index_pool", "engram"):
            part = getattr(self, name)
            if part is not None:
                yield name, part

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for _, part in self._parts())

    def snapshot(self) -> Snapshot:
        arrays, counts = {"window.keys": self.window.keys}, {}
        for name, part in self._parts():
            if isinstance(part, EntryPool):
                counts[name] = part.n
            elif hasattr(part, "arrays"):  # compressor rows, Engram history: replaced, never written
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
        out = list(self.snapshot().arrays.values())
        for _, part in self._parts():
            if isinstance(part, EntryPool):
                out.extend(part.arrays.values())
        return out


def make_cache(model_or_args, batch: int = 1, dtype: mx.Dtype | None = None,
               max_tokens: int | None = None, kv_bits: int | None = None,
               mtp: bool = False) -> list[LayerCache]:
    """One LayerCache per trunk layer (or per MTP block with `mtp=True`).

    `max_tokens` preallocates the compressed pools for that many tokens; without it they grow.
    `kv_bits=8` stores the compressed and index pools as affine 8-bit groups; `kv_bits=4` (V4.1)
    in the official FP4 formats.
    """
    args = getattr(model_or_args, "args", model_or_args)
    if kv_bits not in (None, 8) and not (kv_bits == 4 and args.is_v41):
        raise ValueError(f"kv_bits={kv_bits}: the pools hold bf16, 8-bit groups (8) or, for V4.1, "
                         "the official FP4 formats (4).")
    if dtype is None:
        dtype = getattr(model_or_args, "dtype", mx.bfloat16)
    if mtp:
        layers = range(args.num_hidden_layers, args.num_hidden_layers + args.num_nextn_predict_layers)
    else:
        layers = range(args.num_hidden_layers)
    return [LayerCache(args, i, batch, dtype, max_tokens, kv_bits) for i in layers]
