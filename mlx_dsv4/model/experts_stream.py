"""Routed experts read from the converted safetensors on demand, for Macs too small to hold them.

Non-expert weights stay resident; each layer's routed experts stay in the shards. A stacked
expert tensor `[E, out, in]` is row-major, so expert e of it is one contiguous byte range: the
store reads that range (widened to whole pages) with `os.pread`, per tensor of the expert (w1,
w2, w3 and their scales), and keeps the result in an LRU cache of resident experts whose bytes
never exceed `budget` (`--expert-memory`). Gate and up are concatenated per expert as the
resident model's `FusedPair` does, so the same `gather_qmm` runs over the same rows and the
logits are bit-identical to the resident model's. `Counters` say what each token cost.

The routing of a layer must be on the host before its experts can be fetched, so a streamed
model syncs once per MoE layer and decodes eagerly (`Model.compiled_decode = False`): one
compiled graph over the whole trunk cannot contain a host read. With `prefetch`, while a layer's
experts run, the next top-k layer's experts are guessed by its router applied to this layer's
input and read ahead on a thread pool (reads only; arrays are made on the caller's thread, as
MLX streams are per thread). It is off by default: on Flash-shaped random weights
(benchmarks/ssd_experts.py) a quarter-size cache read 32% more bytes with it and decoded slower;
whether real routing is predictable enough is for `read_ahead` vs `prefetched` to show.
Owns no model maths beyond the expert matmuls; `model.Experts` calls `fetch`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 16384
EXPERT_TENSOR = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(w[123])\.(weight|scales|biases)$")
_NP = {"U32": np.uint32, "U8": np.uint8, "I8": np.int8, "F32": np.float32, "BF16": np.uint16,
       "F16": np.float16, "I32": np.int32}
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
READ_THREADS = 8  # SSDs need several reads in flight to reach their bandwidth


class StreamError(ValueError):
    pass


@dataclass
class Counters:
    """Expert look-ups since the store opened: a hit is an expert already resident; a miss
    waited for a read; `prefetched` were read ahead and found ready (or in flight). `read_ahead`
    counts reads started ahead, used or not; `bytes_read` counts every read, page padding too."""
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    bytes_read: int = 0
    evictions: int = 0
    read_ahead: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.prefetched

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.prefetched) / self.lookups if self.lookups else 0.0

    def since(self, before: Counters) -> Counters:
        return Counters(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))

    def copy(self) -> Counters:
        return Counters(**vars(self))


@dataclass
class _Slice:
    """Where one expert tensor lives: file, byte offset of expert 0, bytes per expert."""
    fd: int
    start: int
    per_expert: int
    dtype: str
    shape: tuple[int, ...]  # one expert's shape
    name: str  # tensor and file, for errors


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _to_mx(raw: np.ndarray, dtype: str) -> mx.array:
    a = mx.array(raw)
    return a.view(mx.bfloat16) if dtype == "BF16" else a


@dataclass
class _Layer:
    """One layer's expert tensors: `{"w1": {"weight": _Slice, "scales": ...}, ...}`."""
    parts: dict[str, dict[str, _Slice]] = field(default_factory=dict)
    experts: int = 0


class ExpertStore:
    """The routed experts of a converted directory, read on demand into an LRU of `budget` bytes."""

    def __init__(self, path: str | Path, shards: list[Path], budget: int, prefetch: bool = False):
        self.budget, self.prefetch_enabled = budget, prefetch
        self.counters = Counters()
        self.layers: dict[str, _Layer] = {}
        self._fds: list[int] = []
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dsv4-experts")
        self._lock = threading.Lock()
        # Files and threads go with the store, closed or not (a dropped model closes it).
        self.close = weakref.finalize(self, _release, self._pool, self._fds)
        for f in shards:
            data, header = read_header(f)
            fd = None
            for name, v in header.items():
                m = EXPERT_TENSOR.match(name)
                if not m:
                    continue
                if fd is None:
                    fd = os.open(f, os.O_RDONLY)
                    self._fds.append(fd)
                    _no_page_cache(fd)
                shape = tuple(v["shape"])
                lo, hi = v["data_offsets"]
                if v["dtype"] not in _NP or (hi - lo) % shape[0]:
                    raise StreamError(f"{f}: {name} ({v['dtype']}, {shape}) cannot be read per expert.")
                layer = self.layers.setdefault(f"{m.group(1)}.{m.group(2)}", _Layer())
                layer.experts = shape[0]
                layer.parts.setdefault(m.group(3), {})[m.group(4)] = _Slice(
                    fd, data + lo, (hi - lo) // shape[0], v["dtype"], shape[1:], f"{name} in {f}")
        for key, layer in self.layers.items():
            if set(layer.parts) != {"w1", "w2", "w3"}:
                raise StreamError(f"{path}: {key} lacks some of its expert tensors w1, w2, w3.")
        self._cache: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self.resident_bytes = 0
        self._pending: dict[tuple[str, int], Future] = {}
        self._ahead: set[tuple[str, int]] = set()  # read ahead and not looked up yet

    @staticmethod
    def owns(name: str) -> bool:
        """Whether a tensor of the directory is a routed expert's (read by the store, not loaded)."""
        return EXPERT_TENSOR.match(name) is not None

    def expert_bytes(self, layer: str) -> int:
        return sum(s.per_expert for parts in self.layers[layer].parts.values() for s in parts.values())

    # Reading runs on the pool's threads: numpy buffers only, no MLX.
    def _read(self, s: _Slice, e: int) -> np.ndarray:
        lo = s.start + e * s.per_expert
        a = lo // PAGE * PAGE
        b = -(-(lo + s.per_expert) // PAGE) * PAGE
        buf = os.pread(s.fd, b - a, a)
        if _DONTNEED is not None:  # Linux: the LRU is the only copy, as F_NOCACHE makes it on macOS
            os.posix_fadvise(s.fd, a, b - a, _DONTNEED)
        with self._lock:
            self.counters.bytes_read += len(buf)
        if len(buf) < lo - a + s.per_expert:
            raise StreamError(f"expert {e} of {s.name} is cut short: the file is truncated.")
        raw = np.frombuffer(buf, np.uint8, s.per_expert, lo - a)
        return raw.view(_NP[s.dtype]).reshape(s.shape)

    def _read_expert(self, layer: str, e: int) -> dict:
        parts = self.layers[layer].parts
        return {w: {k: (self._read(s, e), s.dtype) for k, s in parts[w].items()} for w in parts}

    def _submit(self, key):
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._read_expert, *key)
        return self._pending[key]

    def _insert(self, key, raw: dict) -> dict:
        """Arrays of one expert from its buffers: gate and up fused as the resident model has them."""
        arrays = {w: {k: _to_mx(a, dt) for k, (a, dt) in d.items()} for w, d in raw.items()}
        entry = {"w13": {k: mx.concatenate([arrays["w1"][k], arrays["w3"][k]], axis=0)
                         for k in arrays["w1"]},
                 "w2": arrays["w2"]}
        mx.eval(entry)
        nbytes = sum(a.nbytes for d in entry.values() for a in d.values())
        self._cache[key] = entry
        self.resident_bytes += nbytes
        while self.resident_bytes > self.budget and self._cache:
            gone, old = self._cache.popitem(last=False)
            self._ahead.discard(gone)
            self.resident_bytes -= sum(a.nbytes for d in old.values() for a in d.values())
            self.counters.evictions += 1
        return entry

    def _drain(self):
        """Move finished read-aheads into the cache, so they count against the budget at once."""
        for key in [k for k, f in self._pending.items() if f.done()]:
            fut = self._pending.pop(key)
            if key not in self._cache:
                self._insert(key, fut.result())

    def get(self, layer: str, experts: list[int]) -> list[dict]:
        """The arrays of `experts` of `layer`, read as needed; they stay valid after eviction."""
        self._drain()
        found, wait = {}, {}
        for e in experts:
            key = (layer, e)
            if key in self._cache:
                self._cache.move_to_end(key)
                found[e] = self._cache[key]
                if key in self._ahead:
                    self._ahead.discard(key)
                    self.counters.prefetched += 1
                else:
                    self.counters.hits += 1
            elif key in self._pending:
                wait[e] = self._pending[key]
                self._ahead.discard(key)
                self.counters.prefetched += 1
            else:
                wait[e] = self._submit(key)  # all misses of the layer in flight at once
                self.counters.misses += 1
        for e, fut in wait.items():
            raw = fut.result()
            self._pending.pop((layer, e), None)
            found[e] = self._insert((layer, e), raw)
        return [found[e] for e in experts]

    def prefetch(self, layer: str, experts) -> None:
        """Start reading experts of `layer` that are neither resident nor on their way."""
        if not self.prefetch_enabled:
            return
        for e in experts:
            key = (layer, int(e))
            if key not in self._cache and key not in self._pending:
                self._submit(key)
                self._ahead.add(key)
                self.counters.read_ahead += 1

    def fetch(self, layer: str, idx: mx.array):
        """`(idx renumbered into the fetched experts, (w13, w2))` for the picks `idx`."""
        picks = np.array(idx)  # the sync: routing has to be known on the host
        unique = np.unique(picks)
        entries = self.get(layer, unique.tolist())
        lookup = np.zeros(self.layers[layer].experts, picks.dtype)
        lookup[unique] = np.arange(len(unique), dtype=picks.dtype)
        local = mx.array(lookup[picks])

        def stack(w):
            return {k: mx.stack([en[w][k] for en in entries]) for k in entries[0][w]}

        return local, (stack("w13"), stack("w2"))


def _expert_mm(x, w: dict, quant, idx, sorted_indices):
    """`gather_qmm` (or `gather_mm`) over stacked experts, as `layers.FusedPair.experts` runs it."""
    if quant:
        g, bits, mode = quant
        return mx.gather_qmm(x, w["weight"], w["scales"], w.get("biases"), rhs_indices=idx,
                             transpose=True, group_size=g, bits=bits, mode=mode,
                             sorted_indices=sorted_indices)
    return mx.gather_mm(x, w["weight"].swapaxes(-1, -2), rhs_indices=idx,
                        sorted_indices=sorted_indices)


class StreamedLayer:
    """What `model.Experts` of one layer calls instead of its own weights: `fetch(idx, x)`."""

    PREFETCH_PICKS = 64  # read ahead in decode-sized steps only; a prefill chunk needs most experts

    def __init__(self, store: ExpertStore, key: str, quant13, quant2, split: int):
        self.store, self.key = store, key
        self.quant13, self.quant2, self.split = quant13, quant2, split
        self.next: tuple[StreamedLayer, object] | None = None  # (next layer, its top-k router)

    def fetch(self, idx: mx.array, x: mx.array):
        """(idx renumbered, gate_up(xs, ids, sorted_indices), down(h, ids, sorted_indices))."""
        guess = None
        if self.next is not None and self.store.prefetch_enabled and idx.size <= self.PREFETCH_PICKS:
            # The next layer's router on this layer's input: a guess, and free to be wrong.
            guess = self.next[1](x, None)[0]
            mx.eval(idx, guess)
        local, (w13, w2) = self.store.fetch(self.key, idx)
        if guess is not None:
            self.store.prefetch(self.next[0].key, np.unique(np.array(guess)).tolist())

        def gate_up(xs, ids, sorted_indices=False):
            y = _expert_mm(xs, w13, self.quant13, ids, sorted_indices)
            return y[..., : self.split], y[..., self.split :]

        def down(h, ids, sorted_indices=False):
            return _expert_mm(h, w2, self.quant2, ids, sorted_indices)

        return local, gate_up, down


def attach(model, path: Path, shards: list[Path], budget: int, prefetch: bool = False) -> ExpertStore:
    """Back every MoE layer of `model` by an `ExpertStore` over `shards`; returns the store.

    Call after `nn.quantize` (the expert modules' quantization is read from them) and before
    loading the other weights (the expert parameters leave the model here).
    """
    store = ExpertStore(path, shards, budget, prefetch)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    blocks += [(f"mtp.{i}", b) for i, b in enumerate(model.mtp)]
    made = []
    for key, block in blocks:
        experts = block.ffn.experts
        if key not in store.layers:
            raise StreamError(f"{path}: no routed expert tensors for {key} in the shards.")

        def quant(m):
            return (m.group_size, m.bits, m.mode) if "scales" in m else None

        layer = StreamedLayer(store, key, quant(experts.w1), quant(experts.w2),
                              experts.w1["weight"].shape[1])
        experts.stream_from(layer)
        made.append((layer, block.ffn.gate))
    trunk = made[: len(model.layers)]
    for (layer, _), (nxt, gate) in zip(trunk, trunk[1:]):
        if "tid2eid" not in gate:  # a hash layer's picks depend on the token, not on x
            layer.next = (nxt, gate)
    model.compiled_decode = False  # routing is read on the host once per layer
    model.expert_store = store
    return store


def _release(pool: ThreadPoolExecutor, fds: list[int]) -> None:
    pool.shutdown(wait=True)
    for fd in fds:
        os.close(fd)
    fds.clear()


def _no_page_cache(fd: int) -> None:
    """The cache here is the only copy: on macOS keep the OS from caching the file pages too."""
    import fcntl

    nocache = getattr(fcntl, "F_NOCACHE", 48 if os.uname().sysname == "Darwin" else None)
    if nocache is not None:
        try:
            fcntl.fcntl(fd, nocache, 1)
        except OSError:
            pass
