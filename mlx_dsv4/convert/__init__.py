"""`convert`: an official DeepSeek-V4 checkpoint, local or on the Hub, to an MLX model directory.

Plans from headers (`plan.py`), then streams: source shards in order, each opened lazily with
`mx.load` (plus at most one neighbour that holds a scale), one job at a time evaluated, written at
its planned offset (`shards.py`), dropped, and the MLX cache cleared. Peak memory is therefore one
job's working set plus the previous job's outputs (written while the next job computes), over the
interpreter, whatever the checkpoint size. A Hub source is planned
from the Hub's headers, pinned to one commit, and downloaded only after the disk space check.
The per-tensor arithmetic is in `quant.py`; this module only sequences it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import __version__, hub
from ..config import ConfigError, load_json
from . import quant
from .plan import (DEFAULT_RECIPE, INDEX, RECIPES, ConvertError, Header, Plan, Recipe, Source,
                   make_plan, read_source)
from .shards import (EXTRA_FILES, PROGRESS, PROGRESS_TMP, ShardWriter, progress_record,
                     recorded_bytes)

__all__ = ["ConvertError", "DEFAULT_RECIPE", "Progress", "Result", "RECIPES", "Recipe", "convert"]

# What an otherwise empty output directory may hold (macOS Finder writes .DS_Store on opening it).
IGNORED = {".DS_Store"}
SOURCE_FILES = ("model-*.safetensors", "model.safetensors", "model.safetensors.index.json",
                "config.json", *EXTRA_FILES)


@dataclass(frozen=True)
class Progress:
    """Reported after every job: source bytes done of the bytes this run has to process."""

    done: int
    total: int
    shard: str
    tensor: str


@dataclass
class Result:
    plan: Plan
    output: Path
    dry_run: bool
    download_bytes: int = 0  # bytes a Hub source still has to fetch (upper bound on a dry run)
    reused: list[str] = field(default_factory=list)  # shards kept from an interrupted run
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False  # this run wrote the index (False: the directory was complete already)

    @property
    def disk_bytes(self) -> int:
        return self.download_bytes + self.plan.bytes_out


def convert(source: str | Path, output_dir: str | Path, *, recipe: str | Recipe = DEFAULT_RECIPE,
            revision: str | None = None, dry_run: bool = False, shard_size: int = 5 * 10**9,
            progress: Callable[[Progress], None] | None = None, api=None) -> Result:
    """Convert `source` (directory or repo id) into `output_dir`; rerun the same call to resume.

    `recipe` is the name of one of RECIPES, or a Recipe (benchmarks measure unregistered ones).
    `api` replaces `huggingface_hub.HfApi()` for Hub sources (tests pass a fake one).
    """
    t0 = time.perf_counter()
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ConvertError(f"Unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
        recipe = RECIPES[recipe]
    out = Path(output_dir)
    remote = not hub.is_local(source)
    if remote:
        # An unfinished run of the same source and revision stays on the commit it started from,
        # even if the branch has moved since (a README edit): resuming finishes that conversion.
        started = (progress_record(out).get("meta") or {}) if out.is_dir() else {}
        same = (started.get("source"), started.get("revision")) == (str(source), revision)
        if same and started.get("commit"):
            hub.check_repo_id(str(source))
            pinned = started["commit"]
        else:
            pinned = hub.commit(str(source), revision, api=api)
        config, headers = hub.remote_headers(str(source), pinned, api=api)
        plan = make_plan(Source(config, {n: Header(*h) for n, h in headers.items()}), recipe, shard_size)
        meta = _metadata(str(source), revision, pinned, recipe.name)
    else:
        if revision is not None:
            raise ConvertError("--revision applies to Hugging Face sources, not to a local directory.")
        path = Path(source)
        plan = make_plan(read_source(path), recipe, shard_size)
        meta = _metadata(str(path.resolve()), None, _snapshot_commit(path), recipe.name)
    fingerprint = _fingerprint(plan, meta)
    if dry_run:
        return Result(plan, out, True, download_bytes=plan.bytes_in if remote else 0)
    if _check_output(out, fingerprint, None if remote else Path(source)) == "complete":
        return Result(plan, out, False, reused=[s.name for s in plan.shards])
    _make_output(out)
    if remote:
        path = hub.resolve(str(source), pinned, SOURCE_FILES, output_dir=out,
                           output_bytes=plan.bytes_out - recorded_bytes(out, fingerprint), api=api)
        local = make_plan(read_source(path), recipe, shard_size)
        if [s.header for s in local.shards] != [s.header for s in plan.shards]:
            raise ConvertError(f"The files downloaded to {path} do not match the headers the Hub "
                               "reported for the same commit; delete them and retry.")
        plan = local
    engram_map = _engram_map(plan, path)
    writer = ShardWriter(out, plan, fingerprint, meta)
    hub.require_space([(out, plan.bytes_out - sum(i["size"] for i in writer.done.values()))],
                      what=f"write {out}")
    try:
        _stream(plan, path, writer, progress)
        if engram_map is not None:
            _engram(plan, path, out, engram_map, progress)
        writer.finish(path, _config(plan, meta, fingerprint))
    except OSError as e:  # disk full, read errors: the index is never written, the run resumes
        raise ConvertError(f"Conversion stopped: {_os_message(e)}. {out} is left incomplete (no "
                           "index); rerun the same command to resume.") from e
    finally:
        writer.close()
    written = [s.name for s in plan.shards if s.name not in writer.reused]
    return Result(plan, out, False, reused=writer.reused, written=written,
                  seconds=time.perf_counter() - t0, finished=True)


def _stream(plan: Plan, root: Path, writer: ShardWriter, progress) -> None:
    jobs = [j for j in plan.jobs if any(writer.pending(t) for t in j.targets)]
    sizes = [plan.source.tensors[j.weight].nbytes
             + (plan.source.tensors[j.scale].nbytes if j.scale else 0) for j in jobs]
    total, done = sum(sizes), 0
    reader = _Reader(root, plan.source.tensors)

    def flush(job, arrays, size):
        nonlocal done
        try:
            for name, a in zip(job.targets, arrays):
                quant.check(a, plan.targets[name])
                writer.write(name, job.piece, quant.to_buffer(a))  # waits for its evaluation
        except RuntimeError as e:  # mx.load reads lazily: a bad file surfaces here
            raise OSError(f"reading {job.weight} from {plan.source.tensors[job.weight].shard} "
                          f"failed ({e})") from e
        del arrays[:]
        mx.clear_cache()
        done += size
        if progress:
            progress(Progress(done, total, plan.source.tensors[job.weight].shard, job.weight))

    previous = None
    for job, size in zip(jobs, sizes):
        scale = reader.take(job.scale) if job.scale else None
        arrays = quant.run(job, reader.take(job.weight), scale, [plan.targets[t] for t in job.targets])
        # Read and compute this job while the previous one's bytes are written: two jobs in flight.
        mx.async_eval(arrays)
        if previous:
            flush(*previous)
        previous = (job, arrays, size)
        del scale
    if previous:
        flush(*previous)


def _engram_map(plan: Plan, root: Path) -> list[int] | None:
    """A V4.1 model's Engram token map, checked before any byte is written (None: no Engram)."""
    from ..config import ModelArgs

    args = ModelArgs.from_dict(plan.config)
    if not args.engram_layer_ids:
        return None
    from .engram import token_map

    return token_map(root, args)


def _engram(plan: Plan, root: Path, out: Path, engram_map: list[int], progress) -> None:
    """The token map, then the Engram tables (each resumes where an interrupted run stopped)."""
    from ..model.engram import TOKEN_MAP
    from .engram import write_tables
    from .shards import write_atomic

    write_atomic(out / TOKEN_MAP, json.dumps(engram_map, separators=(",", ":")))
    report = None if progress is None else (
        lambda done, total, name: progress(Progress(done, total, name, name)))
    write_tables(plan, root, out, report)


class _Reader:
    """Lazy `mx.load` dicts of at most two source shards: the current one and a scale's neighbour.

    Each tensor is popped when taken, so an evaluated tensor lives only as long as its job.
    """

    def __init__(self, root: Path, headers: dict[str, Header]):
        self.root, self.headers, self.open = root, headers, {}

    def take(self, name: str) -> mx.array:
        shard = self.headers[name].shard
        if shard not in self.open:
            if len(self.open) == 2:
                del self.open[next(iter(self.open))]
            try:
                self.open[shard] = mx.load(str(self.root / shard))
            except RuntimeError as e:
                raise OSError(f"cannot read {self.root / shard} ({e})") from e
        self.open[shard] = self.open.pop(shard)  # most recently used last
        return self.open[shard].pop(name)


def _check_output(out: Path, fingerprint: str, source: Path | None) -> str:
    """`new`, `resume` or `complete`; anything else in the directory is refused.

    Every state an interrupted run can leave is `new` or `resume`: the progress record is saved
    before any shard exists, so a directory without it holds at most that record's temp file.
    """
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} is a file; the output must be a new or empty directory.")
    if source is not None and out.exists() and out.resolve() == source.resolve():
        raise ConvertError(f"The output directory {out} is the source directory; choose another one.")
    ours = IGNORED | {PROGRESS_TMP}  # the temp file: stopped before the first record's rename
    held = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.exists() else []
    if not held:
        return "new"
    if (out / PROGRESS).exists():
        return "resume"  # the writer checks that the run has the same settings
    if (out / INDEX).exists() and (out / "config.json").exists():
        try:
            done = load_json(out / "config.json").get("mlx_dsv4") or {}
        except ConfigError:
            done = {}
        if not done or not isinstance(done, dict):
            raise ConvertError(f"{out} holds a model that mlx-dsv4 did not convert; remove it or "
                               "choose another directory.")
        if done.get("fingerprint") == fingerprint:
            return "complete"
        at = f" at commit {done['commit']}" if done.get("commit") else ""
        raise ConvertError(f"{out} holds another converted model (recipe {done.get('recipe')!r} of "
                           f"{done.get('source')!r}{at}); remove it or choose another directory.")
    raise ConvertError(f"{out} already holds other files ({', '.join(held[:5])}); choose a new or "
                       "empty directory.")


def _make_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        why = f"{parent} is a file" if parent.exists() and not parent.is_dir() else e.strerror or e
        raise ConvertError(f"Cannot create the output directory {out}: {why}.") from e


def _os_message(e: OSError) -> str:
    """`path: reason` without Python's `[Errno n]` prefix (the path is dropped when unknown)."""
    if e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


def _metadata(source: str, revision, commit, recipe: str) -> dict:
    return {"source": source, "revision": revision, "commit": commit, "recipe": recipe,
            "converter": f"mlx-dsv4 {__version__}"}


def _snapshot_commit(path: Path) -> str | None:
    # A Hugging Face cache snapshot is a folder named after its commit.
    name = path.resolve().name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None


def _fingerprint(plan: Plan, meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for s in plan.shards:
        h.update(s.name.encode() + s.header)
    return h.hexdigest()


def _config(plan: Plan, meta: dict, fingerprint: str) -> dict:
    """The source config with the MLX quantization block; the FP8 block no longer applies."""
    config = dict(plan.config or plan.source.config)
    shipped = config.pop("quantization_config", None)
    config["quantization"] = plan.quantization
    config["mlx_dsv4"] = dict(meta, fingerprint=fingerprint, source_quantization_config=shipped)
    if plan.dropped:
        config["mlx_dsv4"]["dropped"] = dropped_note(plan)
    if plan.engram:
        config["mlx_dsv4"]["engram"] = {t.weight: t.file for t in plan.engram}
    return config


# What each dropped group is and why it is left out.
_DROPPED = (("mtp.", "DSpark draft-stage tensors (mtp.*)", "speculative drafting is not supported"),
            (("vision.", "aligner.", "image_"), "vision-tower tensors (vision.*, aligner.*, image_*)",
             "images are not supported"),
            (".gate.bias_vl", "image-token router biases (ffn.gate.bias_vl)", "images are not supported"))


def dropped_note(plan: Plan) -> str:
    parts = []
    for match, what, why in _DROPPED:
        n = sum(1 for d in plan.dropped if (d.endswith(match) if match == ".gate.bias_vl"
                                            else d.startswith(match)))
        if n:
            parts.append(f"{n:,} {what} not converted: {why}")
    return "; ".join(parts) + "; the trunk is complete"
