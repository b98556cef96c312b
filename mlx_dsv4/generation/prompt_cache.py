"""The prompt cache: decode state at prompt boundaries, kept across conversations and restarts.

A session's own snapshots hold pool counts only, so they are valid for its one live cache. This
cache keeps *materialised* states instead: each pool sliced to its live count (a copy, once per
prompt, never per token), the window ring, the compressors' rows and carries. States live in an
LRU bounded by bytes and are found by the longest stored token sequence that the new prompt
starts with; a hit is written into a fresh cache, which then equals what prefilling that prefix
would have built (V4 state cannot be trimmed, so only whole stored prefixes are usable).

States of long prompts are also written to a folder, one safetensors file per prompt, named by
the model's fingerprint and a hash of the tokens; the header carries the tokens' count, the
fingerprint and a digest of the data. Files appear under their final name only once complete
(written aside, then renamed), the folder is bounded with LRU eviction, and a file that is
corrupt, truncated, foreign or does not fit this model is ignored with a warning and removed.
Disk writes run on a background thread that touches no MLX (host bytes are made beforehand).
Knows no HTTP, no terminal, no tokenizer.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..model.cache import EntryPool, LayerCache, _write

log = logging.getLogger("mlx_dsv4.generation.prompt_cache")

FORMAT, VERSION = "mlx-dsv4-prompt-cache", "1"
SUFFIX = ".safetensors"
# safetensors dtype name, the mx dtype, and the numpy dtype its bytes are read as.
DTYPES = {"BF16": (mx.bfloat16, np.uint16), "F16": (mx.float16, np.float16),
          "F32": (mx.float32, np.float32), "U32": (mx.uint32, np.uint32),
          "I32": (mx.int32, np.int32), "U8": (mx.uint8, np.uint8)}
_NAMES = {mx_dtype: name for name, (mx_dtype, _) in DTYPES.items()}
# The header is a few KB per layer; a larger one is not ours and is not read.
MAX_HEADER = 16 << 20


DEFAULT_BYTES = 1 << 30  # memory: about six 25K-token Flash prompts
DEFAULT_DISK_BYTES = 20 * 10**9


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-dsv4" / "prompt-cache"


def model_fingerprint(model_dir: str | Path, *, kv_bits: int | None = None,
                      dtype: str = "bfloat16") -> str:
    """A hash of what decides the decode state: config.json, each weight file's name, size,
    header and first and last 64 KiB (reading every byte of 150 GB would take minutes), the
    pools' recipe (`kv_bits`, dtype) and this file format's version."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}/kv_bits={kv_bits}/dtype={dtype}".encode())
    root = Path(model_dir)
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as f:
            if path.suffix == ".json":
                h.update(f.read())
                continue
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read())
    return h.hexdigest()


def token_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


@dataclass
class State:
    """The decode state of every layer after `tokens`: `layers[i]` maps "part.attr" names
    ("window.keys", "compressor.kv", "kv_pool.data", …) to arrays; pools hold `n` rows."""

    tokens: np.ndarray  # int32
    layers: list[dict[str, mx.array]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.values())


def capture(cache: Sequence[LayerCache], tokens: Sequence[int]) -> State:
    """Materialise `cache` (which holds exactly `tokens`): pools are copied up to their count."""
    assert all(c.offset == len(tokens) for c in cache), "the cache does not hold these tokens"
    layers = []
    for c in cache:
        layer = dict(c.snapshot().arrays)  # ring and compressor rows: replaced, never written
        for name in ("kv_pool", "index_pool"):
            pool = getattr(c, name)
            if pool is not None:
                # A copy: a view would share the pool's buffer and make every later append copy it.
                layer.update({f"{name}.{k}": mx.contiguous(a[:, : pool.n])
                              for k, a in pool.arrays.items()})
        layers.append(layer)
    mx.eval([list(layer.values()) for layer in layers])
    return State(np.asarray(tokens, np.int32), layers)


def _layout(c: LayerCache) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """Shape (pool rows as -1) and dtype of each array a state of this layer must have."""
    out = {k: (tuple(a.shape), a.dtype) for k, a in c.snapshot().arrays.items()}
    for name in ("kv_pool", "index_pool"):
        pool = getattr(c, name)
        if pool is not None:
            out.update({f"{name}.{k}": ((a.shape[0], -1, a.shape[2]), a.dtype)
                        for k, a in pool.arrays.items()})
    return out


def check(cache: Sequence[LayerCache], state: State):
    """Raise ValueError unless `state` is a state of this model's `cache` layout (touches nothing)."""
    n = len(state.tokens)
    if len(state.layers) != len(cache):
        raise ValueError(f"{len(state.layers)} layers, the model has {len(cache)}")
    for i, (c, layer) in enumerate(zip(cache, state.layers)):
        want = _layout(c)
        if set(want) != set(layer):
            raise ValueError(f"layer {i} holds {sorted(layer)}, expected {sorted(want)}")
        for k, (shape, dtype) in want.items():
            a = layer[k]
            rows = n // c.ratio if k.endswith(("_pool.data", "_pool.scales", "_pool.biases")) else None
            expect = tuple(rows if d == -1 else d for d in shape)
            if tuple(a.shape) != expect or a.dtype != dtype:
                raise ValueError(f"layer {i} {k}: {a.dtype} {tuple(a.shape)}, expected {dtype} {expect}")


def restore(cache: Sequence[LayerCache], state: State):
    """Write `state` into `cache` (fresh from `make_cache`, or any cache of the same model)."""
    check(cache, state)
    n = len(state.tokens)
    for c, layer in zip(cache, state.layers):
        c.offset = n
        pools: dict[str, dict[str, mx.array]] = {}
        for key, value in layer.items():
            part, attr = key.split(".")
            if part.endswith("_pool"):
                pools.setdefault(part, {})[attr] = value
            else:
                setattr(getattr(c, part), attr, value)
        for part, arrays in pools.items():
            pool: EntryPool = getattr(c, part)
            pool.n = 0
            pool.reserve(n // c.ratio)
            pool.arrays = {k: _write(a, arrays[k], 0) for k, a in pool.arrays.items()}
            pool.n = n // c.ratio
    mx.eval([c.state for c in cache])


# ----- files ------------------------------------------------------------------------------------

def _host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)  # numpy has no bfloat16: keep the bits
    return np.ascontiguousarray(np.asarray(a))


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))  # reshape: empty pools have a zero in their shape


def host_tensors(state: State) -> dict[str, tuple[str, np.ndarray]]:
    """Name -> (safetensors dtype, host array) for every array of `state` (on the MLX thread)."""
    out = {"tokens": ("I32", np.ascontiguousarray(state.tokens, np.int32))}
    for i, layer in enumerate(state.layers):
        out.update({f"{i}.{k}": (_NAMES[a.dtype], _host(a)) for k, a in layer.items()})
    return out


def encode(tensors: dict[str, tuple[str, np.ndarray]], fingerprint: str) -> list:
    """The safetensors file of `host_tensors(state)` as byte pieces, header first (no MLX)."""
    digest, header, pos = hashlib.sha256(), {}, 0
    for name, (dtype, arr) in tensors.items():
        digest.update(_bytes(arr))
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    layers = len({name.split(".")[0] for name in tensors if name != "tokens"})
    header["__metadata__"] = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                              "tokens": str(len(tensors["tokens"][1])), "layers": str(layers),
                              "sha256": digest.hexdigest()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-aligned, as the format recommends
    return [struct.pack("<Q", len(text)), text] + [_bytes(a) for _, a in tensors.values()]


def decode(blob: bytes, fingerprint: str) -> State:
    """Parse and verify a file written by `encode`; raise ValueError saying what is wrong."""
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > min(MAX_HEADER, len(blob) - 8):
        raise ValueError("truncated or not a safetensors file (header length out of range)")
    try:
        header = json.loads(blob[8 : 8 + hlen])
        meta = header.pop("__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("unreadable header") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError("not a prompt cache file of this version")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError("written for another model or recipe")
    data = memoryview(blob)[8 + hlen :]
    try:
        end = max(int(v["data_offsets"][1]) for v in header.values())
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError("unreadable header") from None
    if end != len(data):
        raise ValueError(f"truncated: {len(data):,} data bytes, the header says {end:,}")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError("its data does not match its checksum")
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, v in header.items():
            begin, stop = (int(x) for x in v["data_offsets"])
            arrays[name] = np.frombuffer(data[begin:stop], DTYPES[v["dtype"]][1]).reshape(v["shape"])
        if not 0 < int(meta["layers"]) <= 1024:
            raise ValueError("layer count out of range")
        layers: list[dict[str, mx.array]] = [{} for _ in range(int(meta["layers"]))]
        for name, arr in arrays.items():
            if name == "tokens":
                continue
            i, key = name.split(".", 1)
            a = mx.array(arr)
            if header[name]["dtype"] == "BF16":
                a = a.view(mx.bfloat16)
            layers[int(i)][key] = a
        tokens = arrays["tokens"].astype(np.int32)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError("its tensors do not match its header") from None
    if len(tokens) != int(meta["tokens"]):
        raise ValueError("its token count does not match its header")
    return State(tokens, layers)


def write_atomic(path: Path, pieces: list):
    """Write beside `path`, flush to disk, then rename: `path` is never seen half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as f:
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----- the cache --------------------------------------------------------------------------------

@dataclass
class Hit:
    n: int  # prompt tokens the state holds
    state: State
    source: str  # "memory" or "disk"


class PromptCache:
    """States by token prefix: `max_bytes` in memory (LRU), and, with `directory`, the states of
    prompts of at least `disk_min_tokens` in files, at most `disk_bytes` of them (LRU by use)."""

    def __init__(self, fingerprint: str, *, max_bytes: int = 1 << 30, directory: str | Path | None = None,
                 disk_bytes: int = 16 << 30, min_tokens: int = 1, disk_min_tokens: int = 1024):
        self.fingerprint, self.max_bytes = fingerprint, max_bytes
        self.min_tokens, self.disk_min_tokens, self.disk_bytes = min_tokens, disk_min_tokens, disk_bytes
        self.directory = Path(directory).expanduser() if directory is not None and disk_bytes > 0 else None
        self.states: collections.OrderedDict[str, State] = collections.OrderedDict()
        self._queue: queue.Queue | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._queue = queue.Queue(maxsize=2)  # each pending write holds a prompt's state
            threading.Thread(target=self._writer, name="dsv4-prompt-cache", daemon=True).start()
            atexit.register(self.flush, 60.0)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states.values())

    # ----- lookup

    def lookup(self, ids: Sequence[int], limit: int, floor: int = 0) -> Hit | None:
        """The longest stored state whose tokens `ids[:limit]` starts with and that holds more
        than `floor` tokens, from memory or else from disk."""
        ids = np.asarray(ids[:limit], np.int32)
        best = None
        for key, s in self.states.items():
            n = len(s.tokens)
            if floor < n <= len(ids) and (best is None or n > len(best[1].tokens)) \
                    and np.array_equal(ids[:n], s.tokens):
                best = key, s
        if best is not None:
            self.states.move_to_end(best[0])
            floor = len(best[1].tokens)
            if self.directory is not None:  # its file, if any, is used too: keep it longer
                try:
                    os.utime(self._path(floor, best[0]))
                except OSError:
                    pass
        found = self._from_disk(ids, floor)
        if found is not None:
            return found
        return Hit(len(best[1].tokens), best[1], "memory") if best else None

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
        key = token_hash(state.tokens)
        self.states.pop(key, None)
        if self.directory is not None:
            self._path(len(state.tokens), key).unlink(missing_ok=True)

    def _path(self, n: int, key: str) -> Path:
        return self.directory / f"{self.fingerprint[:16]}-{n:09d}-{key[:32]}{SUFFIX}"

    def _files(self) -> list[tuple[int, str, Path]]:
        out, prefix = [], self.fingerprint[:16] + "-"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        for name in names:
            parts = name[: -len(SUFFIX)].rsplit("-", 2) if name.endswith(SUFFIX) else []
            if name.startswith(prefix) and len(parts) == 3 and parts[1].isdigit():
                out.append((int(parts[1]), parts[2], self.directory / name))
        return out

    def _from_disk(self, ids: np.ndarray, floor: int) -> Hit | None:
        if self.directory is None:
            return None
        for n, key, path in sorted(self._files(), reverse=True):
            if not floor < n <= len(ids) or token_hash(ids[:n])[:32] != key:
                continue
            try:
                state = decode(path.read_bytes(), self.fingerprint)
                if not np.array_equal(state.tokens, ids[:n]):
                    raise ValueError("it holds other tokens than its name says")
            except OSError as e:  # evicted meanwhile, or unreadable: nothing to trust
                log.warning("prompt cache: cannot read %s (%s); prefilling instead", path.name, e)
                continue
            except ValueError as e:
                log.warning("prompt cache: ignoring %s: %s; it is removed and the prompt prefilled",
                            path.name, e)
                path.unlink(missing_ok=True)
                continue
            os.utime(path)  # the folder's LRU order is by last use
            self._remember(token_hash(state.tokens), state)
            return Hit(n, state, "disk")
        return None

    # ----- store

    def store(self, tokens: Sequence[int], cache: Sequence[LayerCache]):
        """Keep the state of `cache`, which holds exactly `tokens`. Never raises: a state that
        cannot be kept is logged, since the reply matters more than caching it."""
        try:
            self._store(tokens, cache)
        except Exception as e:
            log.warning("prompt cache: could not keep this prompt's state: %s", e)

    def _store(self, tokens: Sequence[int], cache: Sequence[LayerCache]):
        if len(tokens) < self.min_tokens:
            return
        key = token_hash(np.asarray(tokens, np.int32))
        to_disk = (self.directory is not None and len(tokens) >= self.disk_min_tokens
                   and not self._path(len(tokens), key).exists())
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        elif to_disk or 0 < self.max_bytes:
            state = capture(cache, tokens)
            self._remember(key, state)
        if to_disk and state is not None:
            try:
                self._queue.put_nowait((self._path(len(tokens), key), host_tensors(state)))
            except queue.Full:
                log.info("prompt cache: %d writes pending, not writing this prompt's state", 2)

    def _remember(self, key: str, state: State):
        if state.nbytes > self.max_bytes:
            return
        self.states[key] = state
        self.states.move_to_end(key)
        total = self.nbytes
        while total > self.max_bytes:
            _, old = self.states.popitem(last=False)
            total -= old.nbytes

    # ----- disk writer (no MLX on this thread)

    def _writer(self):
        while True:
            path, tensors = self._queue.get()
            try:
                write_atomic(path, encode(tensors, self.fingerprint))
                self.evict_disk(keep=path)
            except Exception as e:  # a full disk, a removed folder: the next write tries again
                log.warning("prompt cache: could not write %s: %s", path.name, e)
            finally:
                del tensors
                self._queue.task_done()

    def evict_disk(self, keep: Path | None = None):
        """Remove the least recently used files until the folder holds at most `disk_bytes`
        (`keep` goes last: it is the newest)."""
        files = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                with_stat = entry.stat()
                files.append((entry.path == str(keep), with_stat.st_mtime, with_stat.st_size, entry.path))
        total = sum(f[2] for f in files)
        for _, _, size, path in sorted(files):
            if total <= self.disk_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size

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
                      disk_bytes: int = DEFAULT_DISK_BYTES) -> PromptCache | None:
    """The prompt cache for a converted model (None when both bounds are 0 or no folder is
    given and memory is 0). A folder that cannot be made is warned about and left out."""
    if directory is not None and disk_bytes > 0:
        try:
            Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("prompt cache: cannot use %s (%s); keeping states in memory only", directory, e)
            directory = None
    if max_bytes <= 0 and (directory is None or disk_bytes <= 0):
        return None
    return PromptCache(model_fingerprint(model_dir, kv_bits=kv_bits), max_bytes=max_bytes,
                       directory=directory, disk_bytes=disk_bytes)


__all__ = ["Hit", "PromptCache", "State", "capture", "check", "default_dir", "model_fingerprint",
           "open_prompt_cache", "restore"]
