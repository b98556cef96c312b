"""The prompt cache's folder: which folder it may use, which files in it are its own, and the
only ways it reads, writes and removes them.

The folder is the cache's alone: a marker file (`MARKER`, holding the format and version) says
so. A new or empty folder is claimed (made 0700, the marker written 0600); a folder that holds
anything else and no marker (a model's `config.json` and shards, someone's adapters) is refused
with a sentence, since eviction removes files. Inside a claimed folder the cache only ever
touches names of its own pattern (`<fingerprint>-<tokens>-<hash>.dsv4state` and their
temporaries), and removes a state file by eviction only after its header says it is one.

Files are read by `read_state_file` only: opened without following links and without blocking,
checked to be regular files, and read no further than their header declares (a FIFO, a device,
or a link to one planted under an entry's name is skipped, never read). Files are written 0600,
beside their final name, then renamed. Knows no MLX: the CLI may call `claim` before loading.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mlx_dsv4.generation.prompt_cache")

FORMAT, VERSION = "mlx-dsv4-prompt-cache", "2"
MARKER = ".mlx-dsv4-prompt-cache"
SUFFIX = ".dsv4state"
# <model_tag(fingerprint)>-<tokens held>-<first 32 hex of the tokens' sha256>
NAME = re.compile(r"([0-9a-f]{16})-(\d{9})-([0-9a-f]{32})" + re.escape(SUFFIX))
TEMP = re.compile(r"\.([0-9a-f]{16}-\d{9}-[0-9a-f]{32}" + re.escape(SUFFIX) + r")\.\d+\.\d+\.tmp")
# Version 1 wrote `*.safetensors` into an unmarked folder; a folder holding only those (checked
# by header) and their temporaries is claimed and they are removed: this version cannot read them.
OLD_NAME = re.compile(r"[0-9a-f]{16}-\d{9}-[0-9a-f]{32}\.safetensors")
OLD_TEMP = re.compile(r"\.[0-9a-f]{16}-\d{9}-[0-9a-f]{32}\.safetensors\.\d+\.\d+\.tmp")
# The header is a few KB per layer; a larger one is not ours and is not read.
MAX_HEADER = 16 << 20
STALE_TEMP = 24 * 3600  # seconds: an older temporary is a crashed write, not a slow one
MODEL_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json")


class CacheFolderError(ValueError):
    """The folder given for the prompt cache is not one it may use."""


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-dsv4" / "prompt-cache"


# ----- the folder --------------------------------------------------------------------------------

def claim(directory: str | Path) -> Path:
    """Make `directory` the prompt cache's folder, or raise `CacheFolderError` saying why not.

    A missing or empty folder is created and marked; a marked folder is reused (its mode set
    back to 0700); a folder of version 1 states only is marked and those states removed. Raises
    OSError when the folder cannot be made or read."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise CacheFolderError(f"--prompt-cache-dir {path} is not a folder; point it at an empty "
                               "or new folder the prompt cache can keep to itself.")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _marked(path):
        _private(path)
        return path
    names = os.listdir(path)
    old = [n for n in names if OLD_NAME.fullmatch(n) and _old_state(path / n) or OLD_TEMP.fullmatch(n)]
    foreign = sorted(set(names) - set(old))
    if foreign:
        raise CacheFolderError(_refusal(path, foreign))
    _private(path)
    write_atomic(path / MARKER, [json.dumps({"format": FORMAT, "version": VERSION}).encode() + b"\n"])
    for name in old:
        (path / name).unlink(missing_ok=True)
    if old:
        log.info("prompt cache: removed %d states of an older version from %s", len(old), path)
    return path


def claim_option(options: dict | None):
    """Claim the folder that `open_prompt_cache` options name, if any, before a model loads: a
    folder that is not the cache's own is refused at once. One that cannot be made is left to
    `open_prompt_cache`, which warns and keeps states in memory only."""
    if options and options.get("directory") is not None and options.get("disk_bytes", 1) > 0:
        try:
            claim(options["directory"])
        except OSError:  # (CacheFolderError is a ValueError: it goes up)
            pass


def _refusal(path: Path, foreign: list[str]) -> str:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    model = any(n in MODEL_FILES or n.endswith((".safetensors", ".gguf", ".bin")) for n in foreign)
    what = "holds a model" if model else "holds files the prompt cache did not write"
    return (f"--prompt-cache-dir {path} {what} ({shown}). The prompt cache evicts files from its "
            "folder, so it only uses a folder of its own: point --prompt-cache-dir at an empty or "
            "new folder (or pass --no-prompt-cache).")


def _marked(path: Path) -> bool:
    try:
        blob = _read_regular(path / MARKER, 4096)
        return json.loads(blob).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _old_state(path: Path) -> bool:
    try:
        return read_header(path)[1].get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _private(path: Path):
    try:
        os.chmod(path, 0o700)  # whatever the umask: the states hold conversations' token ids
    except OSError as e:
        log.warning("prompt cache: cannot make %s private (%s)", path, e)


def model_tag(fingerprint: str) -> str:
    """The 16 hex digits that name a model's files."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def state_name(fingerprint: str, n: int, key: str) -> str:
    return f"{model_tag(fingerprint)}-{n:09d}-{key[:32]}{SUFFIX}"


@dataclass(frozen=True)
class Entry:
    n: int  # tokens the state holds
    key: str  # the first 32 hex digits of their sha256
    path: Path


def entries(directory: Path, fingerprint: str) -> list[Entry]:
    """This model's state files in `directory` (by name only: reading checks the rest)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out, tag = [], model_tag(fingerprint)
    for name in names:
        m = NAME.fullmatch(name)
        if m and m.group(1) == tag:
            out.append(Entry(int(m.group(2)), m.group(3), directory / name))
    return out


def remove(path: Path):
    """Remove a state file of ours (a name of our pattern that is not a folder)."""
    if NAME.fullmatch(path.name) and not path.is_dir():
        path.unlink(missing_ok=True)


# ----- reading -----------------------------------------------------------------------------------

class NotRegular(OSError):
    """A name of ours that is a link, a FIFO, a device or a folder: skipped, never read."""


def _open(path: Path) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link
            raise NotRegular(e.errno, "a symbolic link, not a file the cache wrote", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, "not a regular file", str(path))
    return fd


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        piece = os.read(fd, min(left, 1 << 24))
        if not piece:
            raise ValueError(f"truncated: {n - left:,} of {n:,} bytes")
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def _read_regular(path: Path, limit: int) -> bytes:
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ValueError(f"{size:,} bytes, more than {limit:,}")
        return _read_exact(fd, size)
    finally:
        os.close(fd)


def _header(fd: int, size: int) -> tuple[dict, dict, int]:
    if size < 8:
        raise ValueError("shorter than a safetensors header")
    (hlen,) = struct.unpack("<Q", _read_exact(fd, 8))
    if hlen > min(MAX_HEADER, size - 8):
        raise ValueError("truncated or not a safetensors file (header length out of range)")
    try:
        header = json.loads(_read_exact(fd, hlen))
        meta = header.pop("__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("unreadable header") from None
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ValueError("unreadable header")
    return header, meta, 8 + hlen


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of a state file, reading its header only."""
    fd = _open(path)
    try:
        header, meta, _ = _header(fd, os.fstat(fd).st_size)
        return header, meta
    finally:
        os.close(fd)


def read_state_file(path: Path, limit: int) -> tuple[dict, dict, bytes]:
    """(tensor entries, metadata, data bytes) of a state file: a regular file, no larger than
    `limit`, whose size is exactly what its header declares. Raises NotRegular (skip it),
    another OSError (unreadable now) or ValueError (not a sound state file)."""
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        header, meta, start = _header(fd, size)
        try:
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError("unreadable header") from None
        if start + end != size:
            raise ValueError(f"truncated: {size - start:,} data bytes, the header says {end:,}")
        if size > limit:
            raise ValueError(f"{size:,} bytes, more than the folder may hold ({limit:,})")
        return header, meta, _read_exact(fd, end)
    finally:
        os.close(fd)


# ----- writing and eviction ----------------------------------------------------------------------

def write_atomic(path: Path, pieces):
    """Write beside `path` (mode 0600, whatever the umask), flush to disk, then rename: `path`
    is never seen half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            for piece in pieces:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clean_temporaries(directory: Path):
    """Remove temporaries of ours that a crashed write left (older than a day)."""
    now = time.time()
    for name in os.listdir(directory):
        if TEMP.fullmatch(name):
            try:
                st = os.lstat(directory / name)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TEMP:
                    (directory / name).unlink()
            except OSError:
                pass


class Evictor:
    """Keeps a folder's state files within a byte bound, least recently used first. A state
    file may continue another (its parent: the first tokens of its prompt); a parent counts as
    used when any file that continues it is, so children go before their parents."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._known: dict[tuple[str, int, int], tuple[int, str] | None] = {}  # name, size, inode

    def _parent(self, path: Path, st: os.stat_result) -> tuple[int, str] | None:
        """(tokens, key) of the file `path` continues ((0, "") for none), or None when its
        header does not say it is a state file (then it is never removed)."""
        ident = (path.name, st.st_size, st.st_ino)
        if ident not in self._known:  # a name's contents never change: headers are read once
            try:
                _, meta = read_header(path)
                ok = meta.get("format") == FORMAT and meta.get("version") == VERSION
                self._known[ident] = (int(meta["start"]), str(meta["parent"])) if ok else None
            except (OSError, ValueError, KeyError, TypeError):
                self._known[ident] = None
        return self._known[ident]

    def evict(self, bound: int, keep: Path | None = None):
        files: dict[tuple[str, int, str], list] = {}  # (fingerprint, n, key) -> [size, used, parent, path]
        known, self._known = self._known, {}
        for entry in os.scandir(self.directory):
            m = NAME.fullmatch(entry.name)
            if not m or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            ident = (entry.name, st.st_size, st.st_ino)
            if ident in known:
                self._known[ident] = known[ident]
            parent = self._parent(Path(entry.path), st)
            if parent is not None:
                used = float("inf") if keep is not None and entry.path == str(keep) else st.st_mtime
                files[(m.group(1), int(m.group(2)), m.group(3))] = [st.st_size, used, parent, entry.path]
        # A parent was used when its latest child was: propagate from the longest states down.
        for (fp, n, key), f in sorted(files.items(), key=lambda kv: -kv[0][1]):
            start, parent_key = f[2]
            up = files.get((fp, start, parent_key))
            if start and up is not None:
                up[1] = max(up[1], f[1])
        total = sum(f[0] for f in files.values())
        for (_, n, _), (size, _, _, path) in sorted(files.items(), key=lambda kv: (kv[1][1], -kv[0][1])):
            if total <= bound:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
