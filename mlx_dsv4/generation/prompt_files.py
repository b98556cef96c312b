"""What a prompt cache file holds, and which model it is for.

A file is one step of a chain: the state of a prompt's first `end` tokens given the file of its
first `start` tokens (its parent; none when `start` is 0). It carries the tokens
`start … end-1`, the compressed pools' rows those tokens appended, and the small parts of the
state at `end` (window ring, compressor rows and carries), in safetensors layout; the header
names the format, the model's fingerprint, `start`, `end`, the parent's key and a digest of the
data. A long prefill so writes each restore point as one more link, never the whole prefix again.

`model_fingerprint` hashes what decides a state: the config, and for each weight file its
name, size, modification time (ns), inode and content sampled through the whole file.
Knows no HTTP, no tokenizer; files are read and written by `cache_folder` only.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache_folder import FORMAT, VERSION

# safetensors dtype name, the mx dtype, and the numpy dtype its bytes are read as.
DTYPES = {"BF16": (mx.bfloat16, np.uint16), "F16": (mx.float16, np.float16),
          "F32": (mx.float32, np.float32), "U32": (mx.uint32, np.uint32),
          "I32": (mx.int32, np.int32), "U8": (mx.uint8, np.uint8)}
_NAMES = {mx_dtype: name for name, (mx_dtype, _) in DTYPES.items()}
POOL_KEYS = ("_pool.data", "_pool.scales", "_pool.biases")

# A weight file up to this size is hashed whole; a larger one at SAMPLES places spread evenly
# from its first byte to its last (1 MiB of a 4 GB shard: a fraction of a second for all of Flash).
WHOLE_FILE = 64 << 20
SAMPLES, SAMPLE_BYTES = 256, 4096


def model_fingerprint(model_dir: str | Path, *, kv_bits: int | None = None,
                      dtype: str = "bfloat16") -> str:
    """A hash of what decides the decode state: config and other JSON files, each weight file's
    (V4.1's Engram tables included) name, size, mtime (ns), inode and sampled content (header, then samples spread through the
    file), the pools' recipe (`kv_bits`, dtype) and the file format's version. Any rewrite of a
    weight file changes its mtime or inode; an edit that keeps both is caught where sampled."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}/kv_bits={kv_bits}/dtype={dtype}".encode())
    root = Path(model_dir)
    # V4.1's Engram tables (engram/) shape the state too: the rows they hand each token.
    files = sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) + sorted(root.glob("engram/*.safetensors"))
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
        with path.open("rb") as f:
            if path.suffix == ".json" or st.st_size <= WHOLE_FILE:
                while piece := f.read(1 << 20):
                    h.update(piece)
                continue
            (hlen,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(hlen, 64 << 20)))  # the tensor table, whole
            for at in sample_offsets(st.st_size):
                f.seek(at)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def sample_offsets(size: int) -> list[int]:
    """Where the fingerprint reads `SAMPLE_BYTES` of a large file: evenly from start to end."""
    step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
    return [round(i * step) for i in range(SAMPLES)]


def token_hash(tokens) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()


def _host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)  # numpy has no bfloat16: keep the bits
    return np.ascontiguousarray(np.asarray(a))


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))  # reshape: empty pools have a zero in their shape


def host_tensors(tokens: np.ndarray, layers: list[dict[str, mx.array]]) -> dict[str, tuple[str, np.ndarray]]:
    """Name -> (safetensors dtype, host array) for a link's tokens and per-layer arrays (made on
    the MLX thread, so that the writer thread touches no MLX)."""
    out = {"tokens": ("I32", np.ascontiguousarray(tokens, np.int32))}
    for i, layer in enumerate(layers):
        out.update({f"{i}.{k}": (_NAMES[a.dtype], _host(a)) for k, a in layer.items()})
    return out


def encode(tensors: dict[str, tuple[str, np.ndarray]], fingerprint: str, *, start: int, end: int,
           parent: str, layers: int) -> list:
    """The file of one link as byte pieces, header first (no MLX)."""
    digest, header, pos = hashlib.sha256(), {}, 0
    for name, (dtype, arr) in tensors.items():
        digest.update(_bytes(arr))
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    header["__metadata__"] = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                              "start": str(start), "tokens": str(end), "parent": parent,
                              "layers": str(layers), "sha256": digest.hexdigest()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-aligned, as the format recommends
    return [struct.pack("<Q", len(text)), text] + [_bytes(a) for _, a in tensors.values()]


class Link:
    """A decoded file: `tokens` (positions start … end-1), each layer's small parts and the
    pool rows appended over those tokens."""

    def __init__(self, start: int, end: int, parent: str, tokens: np.ndarray,
                 small: list[dict[str, mx.array]], rows: list[dict[str, mx.array]]):
        self.start, self.end, self.parent = start, end, parent
        self.tokens, self.small, self.rows = tokens, small, rows


def decode(header: dict, meta: dict, data: bytes, fingerprint: str) -> Link:
    """Verify and parse what `cache_folder.read_state_file` read; raise ValueError saying what
    is wrong."""
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError("not a prompt cache file of this version")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError("written for another model or recipe")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError("its data does not match its checksum")
    view = memoryview(data)
    try:
        start, end, count = int(meta["start"]), int(meta["tokens"]), int(meta["layers"])
        parent = str(meta["parent"])
        if not 0 < count <= 1024 or not 0 <= start < end:
            raise ValueError("its counts are out of range")
        small: list[dict[str, mx.array]] = [{} for _ in range(count)]
        rows: list[dict[str, mx.array]] = [{} for _ in range(count)]
        tokens = None
        for name, v in header.items():
            begin, stop = (int(x) for x in v["data_offsets"])
            arr = np.frombuffer(view[begin:stop], DTYPES[v["dtype"]][1]).reshape(v["shape"])
            if name == "tokens":
                tokens = arr.astype(np.int32)
                continue
            i, key = name.split(".", 1)
            a = mx.array(arr)
            if v["dtype"] == "BF16":
                a = a.view(mx.bfloat16)
            (rows if key.endswith(POOL_KEYS) else small)[int(i)][key] = a
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError("its tensors do not match its header") from None
    if tokens is None or len(tokens) != end - start:
        raise ValueError("its token count does not match its header")
    return Link(start, end, parent, tokens, small, rows)


__all__ = ["Link", "decode", "encode", "host_tensors", "model_fingerprint", "token_hash"]
