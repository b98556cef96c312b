"""The prompt cache: decode states kept across requests, conversations and restarts, with restore
points inside every long prefill.

A session's own snapshots hold pool counts only, so they are valid for its one live cache. This
cache keeps *materialised* states instead, found by the longest stored token sequence a new
prompt starts with; a hit is written into a fresh cache, which then equals what prefilling that
prefix built (V4 state cannot be trimmed, so only stored prefixes are usable). Those prefixes
are each prompt's end, the point where a cancelled prefill stopped, and a restore point every
`interval` tokens of every prefill: a retried or abandoned prompt resumes from its last one,
and a prompt that differs from an earlier one near its end (a note appended to the last
message, an edited last message) reuses their shared prefix.

Restore points share memory. The compressed pools are append-only, so a state is its `small`
parts (window ring, live compressor rows and carries) plus `segments`: the pools' rows appended
between consecutive restore points of one prefill. A new point copies only the rows since the
previous one and keeps the earlier segments by reference, so a prefill's points hold one copy of
its pools, not one per point. Compressor rows of a window that has not begun are dead (every
row is written before a window closes), so a point at a multiple of 128 tokens omits them. The
LRU bound counts each segment once, however many states share it.

With a folder (`cache_folder`: owned, marked, only its own files touched), points of long
prompts are also written as files, each one link of a chain (`prompt_files`): the rows since
the nearest earlier point already on disk. Disk writes run on a background thread that touches
no MLX (host bytes are made beforehand). Knows no HTTP, no terminal, no tokenizer.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..model.cache import EntryPool, LayerCache, _write
from . import cache_folder
from .cache_folder import NotRegular, default_dir
from .prompt_files import decode, encode, host_tensors, model_fingerprint, token_hash

log = logging.getLogger("mlx_dsv4.generation.prompt_cache")

DEFAULT_BYTES = 1 << 30  # memory: a 77K-token Flash prompt with its restore points fits
DEFAULT_DISK_BYTES = 20 * 10**9
# Restore points every INTERVAL prompt tokens. For Flash (bf16 pools) a point at a multiple of
# 128 costs 5.8 MiB of small parts against 28 MB of pool rows per 4,096 tokens (+21%), and a
# retry or re-ask re-reads at most 4,096 tokens.
INTERVAL = 4096
# Host copies waiting for the disk writer, at most (one write is always let through).
PENDING_BYTES = 1 << 30
_POOLS = ("kv_pool", "index_pool")
_DEAD = ("kv", "gate")  # a compressor's partial-window rows, dead between windows


# ----- states -----------------------------------------------------------------------------------

@dataclass(eq=False)
class Segment:
    """The pools' rows appended over tokens `start … end-1` (`layers[i]` maps "kv_pool.data"
    and the like to `[B, rows, width]`); `key` is the sha256 of the first `end` tokens."""

    start: int
    end: int
    key: str
    layers: list[dict[str, mx.array]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.values())


@dataclass(eq=False)
class State:
    """The decode state after `tokens`: per layer the `small` arrays ("window.keys",
    "compressor.carry_kv", …) and the pools as `segments`, oldest first, ending at `n`."""

    tokens: np.ndarray = field(repr=False)  # int32
    small: list[dict[str, mx.array]] = field(repr=False)
    segments: tuple[Segment, ...] = field(repr=False)
    key: str = ""

    def __post_init__(self):
        self.key = self.key or token_hash(self.tokens)

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def own_bytes(self) -> int:
        """What this state holds beside its segments (which other states may share)."""
        return self.tokens.nbytes + sum(a.nbytes for layer in self.small for a in layer.values())

    @property
    def nbytes(self) -> int:
        return self.own_bytes + sum(s.nbytes for s in self.segments)

    def pool(self, layer: int, name: str) -> mx.array:
        """One pool array whole ("kv_pool.data"), its segments joined (for tests and tools)."""
        return mx.concatenate([s.layers[layer][name] for s in self.segments], axis=1)


def _small(c: LayerCache) -> dict[str, mx.array]:
    """The window and compressor arrays (references: the cache replaces them, never writes)."""
    arrays = dict(c.snapshot().arrays)
    if c.ratio and c.offset % c.ratio == 0:
        for part in ("compressor", "indexer"):
            for name in _DEAD:
                arrays.pop(f"{part}.{name}", None)
    return arrays


def _rows(c: LayerCache, start: int, end: int) -> dict[str, mx.array]:
    """Views of the pool rows appended over tokens `start … end-1`."""
    out = {}
    for name in _POOLS:
        pool = getattr(c, name)
        if pool is not None:
            out.update({f"{name}.{k}": a[:, start // c.ratio : end // c.ratio]
                        for k, a in pool.arrays.items()})
    return out


def capture(cache: Sequence[LayerCache], tokens: Sequence[int], base: State | None = None) -> State:
    """Materialise `cache`, which holds exactly `tokens`. With `base` (an earlier state of this
    same cache), only the pool rows since it are copied; its segments are shared."""
    n = len(tokens)
    assert all(c.offset == n for c in cache), "the cache does not hold these tokens"
    start = base.n if base is not None else 0
    tokens = np.asarray(tokens, np.int32)
    # A copy: a view would keep the pool's whole buffer alive and make every later append copy it.
    rows = [{k: mx.contiguous(a) for k, a in _rows(c, start, n).items()} for c in cache]
    small = [_small(c) for c in cache]
    mx.eval(rows, small)
    segment = Segment(start, n, token_hash(tokens), rows)
    return State(tokens, small, (base.segments if base is not None else ()) + (segment,), segment.key)


def check(cache: Sequence[LayerCache], state: State):
    """Raise ValueError unless `state` is a state of this model's `cache` layout (touches nothing)."""
    if len(state.small) != len(cache):
        raise ValueError(f"{len(state.small)} layers, the model has {len(cache)}")
    ends = [0] + [s.end for s in state.segments]
    if [s.start for s in state.segments] != ends[:-1] or ends[-1] != state.n:
        raise ValueError("its pool segments do not cover its tokens")
    for i, (c, small) in enumerate(zip(cache, state.small)):
        want = {k: (tuple(a.shape), a.dtype) for k, a in c.snapshot().arrays.items()}
        dead = {f"{p}.{k}" for p in ("compressor", "indexer") for k in _DEAD} & set(want)
        if not set(want) - (dead if c.ratio and state.n % c.ratio == 0 else set()) <= set(small) <= set(want):
            raise ValueError(f"layer {i} holds {sorted(small)}, expected {sorted(want)}")
        for k, a in small.items():
            if (tuple(a.shape), a.dtype) != want[k]:
                raise ValueError(f"layer {i} {k}: {a.dtype} {tuple(a.shape)}, expected {want[k]}")
        for s in state.segments:
            rows = _rows(c, 0, 0)
            if len(s.layers) != len(cache) or set(s.layers[i]) != set(rows):
                raise ValueError(f"layer {i} pools hold {sorted(s.layers[i])}, expected {sorted(rows)}")
            count = s.end // c.ratio - s.start // c.ratio if c.ratio else 0
            for k, a in s.layers[i].items():
                expect = (rows[k].shape[0], count, rows[k].shape[2])
                if tuple(a.shape) != expect or a.dtype != rows[k].dtype:
                    raise ValueError(f"layer {i} {k}: {a.dtype} {tuple(a.shape)}, "
                                     f"expected {rows[k].dtype} {expect}")


def restore(cache: Sequence[LayerCache], state: State):
    """Write `state` into `cache` (fresh from `make_cache`, or any cache of the same model)."""
    check(cache, state)
    n = state.n
    for i, (c, small) in enumerate(zip(cache, state.small)):
        c.offset = n
        for key, value in small.items():
            part, attr = key.split(".")
            setattr(getattr(c, part), attr, value)
        for name in _POOLS:
            pool: EntryPool | None = getattr(c, name)
            if pool is None:
                continue
            pool.n = 0
            pool.reserve(n // c.ratio)
            for s in state.segments:
                pool.arrays = {k: _write(a, s.layers[i][f"{name}.{k}"], s.start // c.ratio)
                               for k, a in pool.arrays.items()}
            pool.n = n // c.ratio
    mx.eval([c.state for c in cache])


class Trail:
    """The restore points taken along one live cache, oldest first, as (tokens held, key, the
    state while memory keeps it). A new point copies the pool rows since the last one memory
    still holds, and a new file continues the last one on disk. Valid while the cache only
    grows from its last point; `cut(n)` after the cache went back to `n` tokens."""

    def __init__(self, marks: Sequence[tuple[int, str, weakref.ref | None]] = ()):
        self.marks = list(marks)

    @property
    def last(self) -> int:
        return self.marks[-1][0] if self.marks else 0

    def cut(self, n: int):
        self.marks = [m for m in self.marks if m[0] <= n]

    def base(self) -> State | None:
        for _, _, ref in reversed(self.marks):
            if ref is not None and (state := ref()) is not None:
                return state
        return None


# ----- the cache --------------------------------------------------------------------------------

@dataclass
class Hit:
    n: int  # prompt tokens the state holds
    state: State
    source: str  # "memory" or "disk"


@dataclass
class _Write:
    path: Path
    tensors: dict
    start: int
    end: int
    parent: str
    layers: int

    def __post_init__(self):
        self.nbytes = sum(a.nbytes for _, a in self.tensors.values())


class PromptCache:
    """States by token prefix: `max_bytes` in memory (LRU, shared segments counted once), and,
    with `directory`, the points of prompts of at least `disk_min_tokens` in files, at most
    `disk_bytes` of them (LRU by use). Restore points every `interval` tokens of a prefill."""

    def __init__(self, fingerprint: str, *, max_bytes: int = DEFAULT_BYTES,
                 directory: str | Path | None = None, disk_bytes: int = 16 << 30,
                 min_tokens: int = 1, disk_min_tokens: int = 1024, interval: int = INTERVAL):
        self.fingerprint, self.max_bytes, self.interval = fingerprint, max_bytes, max(1, interval)
        self.min_tokens, self.disk_min_tokens, self.disk_bytes = min_tokens, disk_min_tokens, disk_bytes
        self.states: collections.OrderedDict[str, State] = collections.OrderedDict()
        self._segments: dict[int, list] = {}  # id -> [segment, states holding it]
        self._bytes = 0
        self.directory: Path | None = None
        self._queue: queue.Queue | None = None
        self._pending: dict[Path, _Write] = {}
        self._skipped: set[str] = set()  # names warned about as not regular files
        if directory is not None and disk_bytes > 0:
            self.directory = cache_folder.claim(directory)
            cache_folder.clean_temporaries(self.directory)
            self._evictor = cache_folder.Evictor(self.directory)
            self._queue = queue.Queue()  # bounded by PENDING_BYTES of host copies, not by count
            threading.Thread(target=self._writer, name="dsv4-prompt-cache", daemon=True).start()
            atexit.register(self.flush, 60.0)

    @property
    def nbytes(self) -> int:
        """Bytes the states in memory hold, each shared segment once."""
        return self._bytes

    # ----- lookup

    def lookup(self, ids: Sequence[int], limit: int, floor: int = 0) -> Hit | None:
        """The longest stored state whose tokens `ids[:limit]` starts with and that holds more
        than `floor` tokens, from memory or else from disk."""
        ids = np.asarray(ids[:limit], np.int32)
        best = None
        for s in self.states.values():
            if floor < s.n <= len(ids) and (best is None or s.n > best.n) \
                    and np.array_equal(ids[: s.n], s.tokens):
                best = s
        if best is not None:
            self.states.move_to_end(best.key)
            floor = best.n
            self._touch(best)
        found = self._from_disk(ids, floor)
        if found is not None:
            return found
        return Hit(best.n, best, "memory") if best is not None else None

    def lookup_for(self, ids: Sequence[int], make_fresh, floor: int = 0):
        """`(hit, fresh cache)` for the longest stored prefix of `ids` (all but its last token,
        which must be fed) holding more than `floor` tokens and laid out as `make_fresh()`'s
        cache is, or None. A state stored by a build whose layout differs is discarded with a
        warning, never loaded. The caller `restore`s the hit into the fresh cache."""
        while (hit := self.lookup(ids, len(ids) - 1, floor=floor)) is not None:
            fresh = make_fresh()
            try:
                check(fresh, hit.state)
            except ValueError as e:
                log.warning("prompt cache: a state of %d tokens does not fit this model (%s)", hit.n, e)
                self.discard(hit.state)
                continue
            return hit, fresh
        return None

    def discard(self, state: State):
        self._forget(state.key)
        if self.directory is not None:
            cache_folder.remove(self._path(state.n, state.key))

    def trail(self, state: State | None = None) -> Trail:
        """The trail of a cache that is fresh, or that holds `state` (restored from here)."""
        if state is None:
            return Trail()
        marks = []
        for s in state.segments:
            held = state if s.key == state.key else self.states.get(s.key)
            marks.append((s.end, s.key, weakref.ref(held) if held is not None else None))
        return Trail(marks)

    def _path(self, n: int, key: str) -> Path:
        return self.directory / cache_folder.state_name(self.fingerprint, n, key)

    def _touch(self, state: State):
        """Files of a state used from memory are used too: keep them longer."""
        if self.directory is not None:
            try:
                os.utime(self._path(state.n, state.key))
            except OSError:
                pass

    def _from_disk(self, ids: np.ndarray, floor: int) -> Hit | None:
        if self.directory is None:
            return None
        found = sorted((e for e in cache_folder.entries(self.directory, self.fingerprint)
                        if floor < e.n <= len(ids)), key=lambda e: e.n)
        h, pos, keys = hashlib.sha256(), 0, {}
        for e in found:  # one pass over the prompt hashes every candidate prefix
            h.update(ids[pos : e.n].tobytes())
            pos, keys[e.n] = e.n, h.hexdigest()
        for e in reversed(found):
            if keys[e.n][:32] == e.key and (state := self._load_chain(ids, e.n, keys[e.n])) is not None:
                return Hit(e.n, state, "disk")
        return None

    def _load_chain(self, ids: np.ndarray, n: int, key: str) -> State | None:
        """The state of `ids[:n]` from its file and the files (or memory states) it continues."""
        links, base = [], None
        while n > 0:
            if links and (base := self.states.get(key)) is not None:
                break
            path = self._path(n, key)
            try:
                header, meta, data = cache_folder.read_state_file(path, max(self.disk_bytes, 1 << 20))
                link = decode(header, meta, data, self.fingerprint)
                if link.end != n or not np.array_equal(link.tokens, ids[link.start : n]):
                    raise ValueError("it holds other tokens than its name says")
                parent = token_hash(ids[: link.start]) if link.start else ""
                if link.parent != parent[:32]:
                    raise ValueError("it continues another prompt than its own")
            except NotRegular as e:
                if path.name not in self._skipped:
                    self._skipped.add(path.name)
                    log.warning("prompt cache: skipping %s: %s", path.name, e.strerror)
                return None
            except FileNotFoundError:
                if links and path not in self._pending:  # the chain lost a link: the rest is unusable
                    log.warning("prompt cache: %s continues a state no longer on disk; removing it",
                                links[0][0].name)
                    for p, _, _ in links:
                        cache_folder.remove(p)
                return None
            except OSError as e:
                log.warning("prompt cache: cannot read %s (%s); prefilling instead", path.name, e)
                return None
            except ValueError as e:
                log.warning("prompt cache: ignoring %s: %s; it is removed and the prompt prefilled",
                            path.name, e)
                cache_folder.remove(path)
                return None
            links.append((path, link, key))
            n, key = link.start, parent
        segments, state = (base.segments if base is not None else ()), base
        for path, link, key in reversed(links):
            segments += (Segment(link.start, link.end, key, link.rows),)
            state = State(ids[: link.end].copy(), link.small, segments, key)
            self._remember(state)
            try:
                os.utime(path)  # the folder's LRU order is by last use
            except OSError:
                pass
        return state

    # ----- store

    def due(self, trail: Trail, n: int) -> bool:
        """Whether a prefill at `n` tokens has passed a restore point since the trail's last."""
        return n // self.interval > trail.last // self.interval

    def keep(self, trail: Trail, tokens: Sequence[int], cache: Sequence[LayerCache], *,
             force: bool = False) -> State | None:
        """A restore point of `cache`, which holds exactly `tokens`, if one is due (or `force`),
        added to `trail`. Never raises: a state that cannot be kept is logged, since the reply
        matters more than caching it."""
        n = len(tokens)
        if n < self.min_tokens or n == trail.last or not (force or self.due(trail, n)):
            return None
        try:
            return self._keep(trail, tokens, cache)
        except Exception as e:
            log.warning("prompt cache: could not keep this prompt's state: %s", e)
            return None

    def store(self, tokens: Sequence[int], cache: Sequence[LayerCache], trail: Trail | None = None):
        """Keep the state of `cache`, which holds exactly `tokens` (see `keep`)."""
        self.keep(trail if trail is not None else Trail(), tokens, cache, force=True)

    def _keep(self, trail: Trail, tokens: Sequence[int], cache: Sequence[LayerCache]) -> State | None:
        n, key = len(tokens), token_hash(np.asarray(tokens, np.int32))
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        elif self.max_bytes > 0:
            state = capture(cache, tokens, trail.base())
            if not self._remember(state):
                state = None
        if self.directory is not None and n >= self.disk_min_tokens:
            self._write(trail, tokens, key, cache, state)
        trail.marks.append((n, key, weakref.ref(state) if state is not None else None))
        return state

    def _write(self, trail: Trail, tokens: Sequence[int], key: str, cache: Sequence[LayerCache],
               state: State | None):
        """Queue the file of this point: the rows since the last point of the trail on disk."""
        n, path = len(tokens), self._path(len(tokens), key)
        if path in self._pending or path.exists():
            return
        start, parent = 0, ""
        for m, k, _ in reversed(trail.marks):
            if self._path(m, k) in self._pending or self._path(m, k).exists():
                start, parent = m, k[:32]
                break
        small = state.small if state is not None else [_small(c) for c in cache]
        layers = [{**s, **_rows(c, start, n)} for s, c in zip(small, cache)]
        waiting = sum(j.nbytes for j in list(self._pending.values()))
        if waiting and waiting + sum(a.nbytes for layer in layers for a in layer.values()) > PENDING_BYTES:
            log.info("prompt cache: %.0f MB of writes pending, not writing the state of %d tokens",
                     waiting / 1e6, n)
            return
        job = _Write(path, host_tensors(np.asarray(tokens[start:n], np.int32), layers), start, n,
                     parent, len(cache))
        self._pending[path] = job
        self._queue.put(job)

    def _remember(self, state: State) -> bool:
        """Add `state` to memory (least recently used go to make room); False if it cannot fit."""
        if state.key in self.states:
            self.states.move_to_end(state.key)
            return True
        extra = state.own_bytes + sum(s.nbytes for s in state.segments if id(s) not in self._segments)
        if extra > self.max_bytes:
            return False
        self.states[state.key] = state
        self._bytes += state.own_bytes
        for s in state.segments:
            held = self._segments.setdefault(id(s), [s, 0])
            if not held[1]:
                self._bytes += s.nbytes
            held[1] += 1
        while self._bytes > self.max_bytes:
            self._forget(next(iter(self.states)))
        return state.key in self.states

    def _forget(self, key: str):
        state = self.states.pop(key, None)
        if state is None:
            return
        self._bytes -= state.own_bytes
        for s in state.segments:
            held = self._segments[id(s)]
            held[1] -= 1
            if not held[1]:
                del self._segments[id(s)]
                self._bytes -= s.nbytes

    # ----- disk writer (no MLX on this thread)

    def _writer(self):
        while True:
            job: _Write = self._queue.get()
            try:
                cache_folder.write_atomic(job.path, encode(
                    job.tensors, self.fingerprint, start=job.start, end=job.end, parent=job.parent,
                    layers=job.layers))
                self._evictor.evict(self.disk_bytes, keep=job.path)
            except Exception as e:  # a full disk, a removed folder: the next write tries again
                log.warning("prompt cache: could not write %s: %s", job.path.name, e)
            finally:
                job.tensors = None
                self._pending.pop(job.path, None)
                self._queue.task_done()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait (at most `timeout` s) for pending disk writes; True when none is left."""
        if self._queue is None:
            return True
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks


def open_prompt_cache(model_dir: str | Path, *, kv_bits: int | None = None,
                      max_bytes: int = DEFAULT_BYTES, directory: str | Path | None = None,
                      disk_bytes: int = DEFAULT_DISK_BYTES, interval: int = INTERVAL) -> PromptCache | None:
    """The prompt cache for a converted model (None when both bounds are 0 or no folder is
    given and memory is 0). A folder that is not the cache's own (a model's, one holding other
    files) raises `cache_folder.CacheFolderError`; one that cannot be made is warned about and
    left out."""
    if directory is not None and disk_bytes > 0:
        try:
            directory = cache_folder.claim(directory)
        except OSError as e:  # (a folder that is not the cache's own raises CacheFolderError)
            log.warning("prompt cache: cannot use %s (%s); keeping states in memory only", directory, e)
            directory = None
    if max_bytes <= 0 and (directory is None or disk_bytes <= 0):
        return None
    return PromptCache(model_fingerprint(model_dir, kv_bits=kv_bits), max_bytes=max_bytes,
                       directory=directory, disk_bytes=disk_bytes, interval=interval)


__all__ = ["Hit", "PromptCache", "Segment", "State", "Trail", "capture", "check", "default_dir",
           "model_fingerprint", "open_prompt_cache", "restore"]
