"""The output directory: shard files written in place, a progress file, and the final index.

Each shard's header is known from the plan, so a shard is created at its full size as
`<name>.part` with its header first, and tensor bytes are written at their offsets as jobs
produce them: a stacked expert tensor is filled one expert at a time and never exists in memory.
When the last piece of a shard lands, it is synced, hashed and renamed to its mlx-lm name, and
its size and sha256 go into `PROGRESS`. A rerun keeps the recorded shards whose bytes still
verify and rewrites every other one from scratch, so the result is byte-identical to an
uninterrupted run. `config.json` and, last, `model.safetensors.index.json` are written only when
every shard is final; until then the directory has neither and never looks complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

from .plan import INDEX, ConvertError, Plan

PROGRESS = ".dsv4-convert-progress.json"
PROGRESS_TMP = PROGRESS + ".tmp"  # what `write_atomic` leaves when stopped before its rename
# Files besides the weights that a converted directory carries (Hugging Face fnmatch patterns).
EXTRA_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja",
               "encoding/*", "engram_token_map.json")
_CHUNK = 1 << 22


class ShardWriter:
    def __init__(self, out: Path, plan: Plan, fingerprint: str, meta: dict | None = None):
        self.out, self.plan, self.fingerprint, self.meta = Path(out), plan, fingerprint, meta
        self.out.mkdir(parents=True, exist_ok=True)
        self.done = self._verified()
        self.reused = sorted(self.done)
        self.left = {s.name: sum(t.pieces for t, _ in s.tensors) for s in plan.shards
                     if s.name not in self.done}
        self._files: dict[str, int] = {}
        # Recorded before the first `.part` exists: a run stopped before its first shard is done
        # (Ctrl-C in the first minutes) leaves a directory the same command recognises and resumes.
        self._save()
        for name in self.left:  # unrecorded shards are rewritten whole, whatever is on disk
            for stale in (self.out / name, self.out / f"{name}.part"):
                stale.unlink(missing_ok=True)

    def pending(self, target: str) -> bool:
        return self.plan.where[target][0] in self.left

    def write(self, target: str, piece: int, data: memoryview) -> None:
        """Bytes of `target` (piece `piece` of a stacked tensor) at their planned offset."""
        shard, offset = self.plan.where[target]
        if shard not in self.left:
            return
        t = self.plan.targets[target]
        size = t.nbytes // t.pieces
        assert data.nbytes == size, f"{target}: {data.nbytes} bytes, planned {size}"
        fd = self._open(shard)
        written = os.pwrite(fd, data, offset + piece * size)
        if written != size:
            raise OSError(f"short write to {shard} ({written} of {size} bytes)")
        self.left[shard] -= 1
        if not self.left[shard]:
            self._finish(shard)

    def _open(self, shard: str) -> int:
        if shard not in self._files:
            spec = next(s for s in self.plan.shards if s.name == shard)
            fd = os.open(self.out / f"{shard}.part", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, len(spec.header).to_bytes(8, "little") + spec.header, 0)
            os.ftruncate(fd, spec.size)
            self._files[shard] = fd
        return self._files[shard]

    def _finish(self, shard: str) -> None:
        fd = self._files.pop(shard)
        os.fsync(fd)
        os.close(fd)
        part = self.out / f"{shard}.part"
        digest = sha256(part)
        os.replace(part, self.out / shard)
        del self.left[shard]
        self.done[shard] = {"size": (self.out / shard).stat().st_size, "sha256": digest}
        self._save()

    def _verified(self) -> dict[str, dict]:
        """Recorded shards whose size and checksum still match; the others are redone."""
        record = progress_record(self.out)
        if not record:
            return {}
        if record.get("fingerprint") != self.fingerprint:
            raise ConvertError(f"{self.out} holds an unfinished conversion with other settings (source, "
                               "revision, recipe or shard size); remove it or choose another directory.")
        sizes = {s.name: s.size for s in self.plan.shards}
        good = {}
        for name, info in record.get("shards", {}).items():
            f = self.out / name
            if (f.exists() and f.stat().st_size == info["size"] == sizes.get(name)
                    and sha256(f) == info["sha256"]):
                good[name] = info
        return good

    def _save(self) -> None:
        record = {"fingerprint": self.fingerprint, "meta": self.meta,
                  "shards": dict(sorted(self.done.items()))}
        write_atomic(self.out / PROGRESS, json.dumps(record, indent=1))

    def finish(self, source_dir: Path, config: dict) -> None:
        """Extra files, config.json, then the index last: only now does the directory look done."""
        assert not self.left, f"unfinished shards: {sorted(self.left)}"
        copy_extras(source_dir, self.out)
        write_atomic(self.out / "config.json", json.dumps(config, indent=2) + "\n")
        index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan.targets.values())},
                 "weight_map": {t: w[0] for t, w in sorted(self.plan.where.items())}}
        write_atomic(self.out / INDEX, json.dumps(index, indent=2) + "\n")
        (self.out / PROGRESS).unlink()

    def close(self) -> None:
        """Release open `.part` files after an error; they stay unfinished on disk."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def progress_record(out: Path) -> dict:
    """The progress file of an unfinished conversion in `out`; {} when there is none.

    An unreadable record (only a crash of the machine itself can leave one: it is replaced
    atomically) counts as none, so the run restarts and rewrites every shard.
    """
    path = Path(out) / PROGRESS
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_bytes(out: Path, fingerprint: str) -> int:
    """Bytes of the shards an unfinished run with this fingerprint has recorded and left in
    place (sizes only, no checksums: what a resume will most likely not write again)."""
    record = progress_record(out)
    if record.get("fingerprint") != fingerprint:
        return 0
    return sum(info["size"] for name, info in record.get("shards", {}).items()
               if (Path(out) / name).is_file() and (Path(out) / name).stat().st_size == info["size"])


def copy_extras(src: Path, dst: Path, patterns=EXTRA_FILES) -> list[str]:
    """Copy tokenizer files and the `encoding/` folder (same patterns the download allows)."""
    copied = []
    for f in sorted(Path(src).rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and not rel.startswith(".") and any(fnmatch.fnmatch(rel, p) for p in patterns):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = dst / f"{rel}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dst / rel)
            copied.append(rel)
    return copied


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
