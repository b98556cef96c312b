"""V4.1 Engram tables and token map: the two things a V4.1 conversion writes besides its shards.

Each table (~384M FP8 rows of 256 values plus 8 E8M0 scale bytes in the release, ~100 GB) is
copied, not requantized, into `engram/layers.{i}.safetensors`: one U8 tensor `[rows, 264]`
whose row is the row's codes then its scales, so the runtime reads a row with one `pread`. The
copy streams fixed-size runs of rows (`CHUNK_BYTES`) from the source files with `pread` and
writes them at their offset in a `.part` file, recording the rows done (after an fsync) every
`RECORD_EVERY` bytes: memory stays at a few runs whatever the table size, and an interrupted run
resumes at the last record. The page cache is told to drop what was copied.

The token map (`engram_token_map.json`: the compressed class of every token id) is copied from
the release when it ships one, else derived from `tokenizer.json` as the reference builds it:
each token's decoded text normalized (NFKC, NFD, accents stripped, lowercase, whitespace runs
to one space, stripped), partial UTF-8 tokens keyed by their own token string, classes numbered
by first appearance.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from ..model.engram import TOKEN_MAP
from .plan import ConvertError, EngramTable, Plan
from .shards import write_atomic

CHUNK_BYTES = 64 << 20
RECORD_EVERY = 1 << 30
_SPACE = "\ue000"  # stands for a token that is exactly one space, which Strip would empty
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def derive_token_map(tokenizer_json: str | Path) -> list[int]:
    """The compressed class of every token id of a `tokenizer.json` (see the module doc)."""
    from tokenizers import Regex, Tokenizer, normalizers

    tok = Tokenizer.from_file(str(tokenizer_json))
    norm = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), _SPACE),
        normalizers.Strip(), normalizers.Replace(_SPACE, " ")])
    classes: dict[str, int] = {}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([i], skip_special_tokens=False)
        key = tok.id_to_token(i) if "\ufffd" in text else (norm.normalize_str(text) or text)
        out.append(classes.setdefault(key, len(classes)))
    return out


def token_map(source: Path, args) -> list[int]:
    """The release's map, or one derived from its tokenizer; refused unless it has the config's
    number of classes (every hash multiplier is drawn against that number)."""
    shipped, tokenizer = source / TOKEN_MAP, source / "tokenizer.json"
    if shipped.exists():
        out = json.loads(shipped.read_text())
    elif tokenizer.exists():
        out = derive_token_map(tokenizer)
    else:
        raise ConvertError(f"{source} has neither {TOKEN_MAP} nor tokenizer.json: the Engram "
                           "layers of a V4.1 model hash token classes that one of them defines.")
    classes = max(out) + 1 if out else 0
    if classes != args.engram_compressed_vocab_size:
        raise ConvertError(f"The Engram token map of {source} has {classes} classes; the config's "
                           f"engram_compressed_vocab_size is {args.engram_compressed_vocab_size}.")
    return out


def _data_offset(path: Path, name: str) -> int:
    """File offset of tensor `name`'s data in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def _header(t: EngramTable) -> bytes:
    meta = {"__metadata__": {"format": "mlx-dsv4-engram",
                             "row": f"{t.head_dim} float8_e4m3 codes, then {t.head_dim // 32} "
                                    "e8m0 scales (one per 32 codes)"},
            "table": {"dtype": "U8", "shape": [t.rows, t.row_bytes], "data_offsets": [0, t.nbytes]}}
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _read(fd: int, size: int, offset: int) -> np.ndarray:
    buf = os.pread(fd, size, offset)
    if len(buf) != size:
        raise OSError(f"short read ({len(buf)} of {size} bytes): the source file is truncated")
    if _DONTNEED is not None:
        os.posix_fadvise(fd, offset, size, _DONTNEED)
    return np.frombuffer(buf, np.uint8)


def write_tables(plan: Plan, root: Path, out: Path,
                 progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """Copy every Engram table of `plan` from the source files under `root`; returns the files
    it (re)wrote. A finished file is kept; a `.part` resumes at its record."""
    written, total = [], sum(t.nbytes for t in plan.engram)
    done = sum(t.nbytes for t in plan.engram if (out / t.file).exists())
    for t in plan.engram:
        final = out / t.file
        if final.exists() and final.stat().st_size == len(_header(t)) + t.nbytes:
            continue
        done = _copy(plan, root, out, t, done, total, progress)
        written.append(t.file)
    return written


def _copy(plan: Plan, root: Path, out: Path, t: EngramTable, done: int, total: int, progress) -> int:
    src = plan.source.tensors
    wpath, spath = root / src[t.weight].shard, root / src[t.scale].shard
    part, record = out / f"{t.file}.part", out / f"{t.file}.rows"
    part.parent.mkdir(parents=True, exist_ok=True)
    header = _header(t)
    start = 0
    if part.exists() and record.exists() and part.stat().st_size == len(header) + t.nbytes:
        start = min(int(record.read_text()), t.rows)
    hd, gs = t.head_dim, t.head_dim // 32
    wfd, sfd = os.open(wpath, os.O_RDONLY), os.open(spath, os.O_RDONLY)
    ofd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        woff, soff = _data_offset(wpath, t.weight), _data_offset(spath, t.scale)
        if start == 0:
            os.ftruncate(ofd, 0)
            os.pwrite(ofd, header, 0)
            os.ftruncate(ofd, len(header) + t.nbytes)
        step = max(1, CHUNK_BYTES // t.row_bytes)
        since = 0
        done += start * t.row_bytes
        for r0 in range(start, t.rows, step):
            n = min(step, t.rows - r0)
            rows = np.empty((n, t.row_bytes), np.uint8)
            rows[:, :hd] = _read(wfd, n * hd, woff + r0 * hd).reshape(n, hd)
            rows[:, hd:] = _read(sfd, n * gs, soff + r0 * gs).reshape(n, gs)
            at = len(header) + r0 * t.row_bytes
            if os.pwrite(ofd, rows.data, at) != rows.nbytes:
                raise OSError(f"short write to {part}")
            since += rows.nbytes
            done += rows.nbytes
            if since >= RECORD_EVERY or r0 + n == t.rows:
                os.fsync(ofd)
                if _DONTNEED is not None:
                    os.posix_fadvise(ofd, 0, 0, _DONTNEED)
                write_atomic(record, str(r0 + n))
                since = 0
            if progress:
                progress(done, total, t.file)
    finally:
        for fd in (wfd, sfd, ofd):
            os.close(fd)
    os.replace(part, out / t.file)
    record.unlink(missing_ok=True)
    return done
