"""`dsv4 convert` after an interruption at any point: every leftover state resumes or restarts.

Two ways in, both deterministic: each leftover state an interrupted run can leave is written
directly (including those only a kill or a power cut leaves, with no cleanup run), and a run is
interrupted at every filesystem step it takes (before and after each rename) and then rerun.
Either way the rerun must finish with the same bytes as a run that was never interrupted.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from mlx_dsv4.convert import ConvertError, convert
from mlx_dsv4.convert.shards import INDEX, PROGRESS, PROGRESS_TMP, ShardWriter
from mlx_dsv4.synthetic import tiny_config, write_official_checkpoint

SHARD = 220_000  # the tiny model becomes five output shards (default recipe)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("src"), tiny_config(), shards=2)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert len(convert(source, out, shard_size=SHARD).written) == 5
    return files_of(out)


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def shard_names(reference) -> list[str]:
    return sorted(n for n in reference if n.startswith("model-"))


def rerun_matches(source, out, reference) -> None:
    convert(source, out, shard_size=SHARD)
    assert files_of(out) == reference  # same bytes, and no temp, part or progress file left


@pytest.fixture
def unfinished(source, tmp_path, monkeypatch) -> Path:
    """Every shard written and recorded, nothing after: the base the states below edit."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "finish", lambda self, *a: None)
        convert(source, out, shard_size=SHARD)
    assert (out / PROGRESS).exists() and not (out / INDEX).exists()
    return out


def edit_record(out: Path, edit) -> None:
    record = json.loads((out / PROGRESS).read_text())
    edit(record)
    (out / PROGRESS).write_text(json.dumps(record))


# ----- leftover states written directly ------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b'{"fingerprint": "ab', b'{"fingerprint": "x", "shards": {}}'])
def test_a_lone_temp_progress_file_restarts(source, reference, tmp_path, content):
    # The reported case: stopped between writing the first progress record and renaming it.
    out = tmp_path / "out"
    out.mkdir()
    (out / PROGRESS_TMP).write_bytes(content)
    rerun_matches(source, out, reference)


def test_an_empty_output_directory_starts_fresh(source, reference, tmp_path):
    (tmp_path / "out").mkdir()  # stopped right after creating it
    rerun_matches(source, tmp_path / "out", reference)


def test_progress_without_any_shard_resumes(source, reference, unfinished):
    for f in unfinished.glob("model-*"):
        f.unlink()
    edit_record(unfinished, lambda r: r["shards"].clear())
    rerun_matches(source, unfinished, reference)


def test_a_half_written_part_file_is_rewritten(source, reference, unfinished):
    first = shard_names(reference)[0]
    (unfinished / first).unlink()
    (unfinished / f"{first}.part").write_bytes(reference[first][: len(reference[first]) // 2])
    edit_record(unfinished, lambda r: r["shards"].pop(first))
    (unfinished / PROGRESS_TMP).write_text("{")  # and a later save stopped before its rename
    rerun_matches(source, unfinished, reference)


def test_a_recorded_shard_that_is_missing_or_damaged_is_rewritten(source, reference, unfinished):
    names = shard_names(reference)
    (unfinished / names[1]).unlink()
    damaged = bytearray(reference[names[2]])
    damaged[-1] ^= 0xFF
    (unfinished / names[2]).write_bytes(bytes(damaged))
    rerun_matches(source, unfinished, reference)


def test_a_shard_renamed_but_not_yet_recorded_is_rewritten(source, reference, unfinished):
    edit_record(unfinished, lambda r: r["shards"].pop(shard_names(reference)[-1]))
    rerun_matches(source, unfinished, reference)


def test_stopped_while_writing_the_final_files(source, reference, unfinished):
    (unfinished / "config.json.tmp").write_bytes(reference["config.json"][:50])
    (unfinished / "tokenizer.json.tmp").write_bytes(b"{")
    (unfinished / "encoding").mkdir()
    rerun_matches(source, unfinished, reference)


def test_stopped_before_removing_the_progress_file(source, reference, unfinished):
    for name in ("config.json", INDEX):
        (unfinished / name).write_bytes(reference[name])
    rerun_matches(source, unfinished, reference)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00", b"[1, 2]"])
def test_an_unreadable_progress_record_restarts(source, reference, unfinished, content):
    # Only a crash of the machine could leave one (the record is replaced atomically).
    (unfinished / PROGRESS).write_bytes(content)
    rerun_matches(source, unfinished, reference)


def test_files_of_someone_else_are_still_refused(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PROGRESS_TMP).write_text("{")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match=r"already holds other files \(notes.txt"):
        convert(source, out, shard_size=SHARD)


# ----- interrupted at every step --------------------------------------------------------------------

STEPS = ("replace", "fsync", "ftruncate", "unlink", "pwrite")


class Interrupter:
    """Counts the filesystem calls a conversion makes and raises KeyboardInterrupt at one of them,
    before the call or (`after`) once it is done. Just before raising, it copies the output
    directory to `killed`: what a kill at that point leaves, with no cleanup code run."""

    def __init__(self, monkeypatch, at: int | None = None, after: bool = False,
                 out: Path | None = None, killed: Path | None = None):
        self.at, self.after, self.out, self.killed = at, after, out, killed
        self.calls, self.pwrites = [], 0
        for name in STEPS:
            monkeypatch.setattr(os, name, self.wrap(name, getattr(os, name)))

    def wrap(self, name, real):
        def call(*args, **kwargs):
            if name == "pwrite":  # hundreds of them: count only the first of each shard's file
                self.pwrites += 1
                if self.pwrites > 1 and args[2] != 0:
                    return real(*args, **kwargs)
            n = len(self.calls)
            self.calls.append(name)
            if n == self.at and not self.after:
                self.stop()
            result = real(*args, **kwargs)
            if n == self.at and self.after:
                self.stop()
            return result

        return call

    def stop(self):
        if self.out.exists():
            shutil.copytree(self.out, self.killed)
        raise KeyboardInterrupt


def test_a_rerun_after_an_interruption_at_any_step_finishes_the_same(source, reference, tmp_path,
                                                                      monkeypatch):
    with monkeypatch.context() as m:
        counter = Interrupter(m)  # counts only
        convert(source, tmp_path / "count", shard_size=SHARD)
    steps = counter.calls
    assert steps.count("replace") >= 5 + 6 + 3  # shards; progress saves; extras, config, index
    points = [(k, False) for k in range(len(steps))]
    points += [(k, True) for k, name in enumerate(steps) if name == "replace"]
    for k, after in points:
        out, killed = tmp_path / f"out-{k}-{after}", tmp_path / f"killed-{k}-{after}"
        with monkeypatch.context() as m:
            Interrupter(m, at=k, after=after, out=out, killed=killed)
            with pytest.raises(KeyboardInterrupt):
                convert(source, out, shard_size=SHARD)
        for d in (out, killed):
            convert(source, d, shard_size=SHARD)
            assert files_of(d) == reference, (d.name, steps[k])


def test_the_rerun_that_completes_a_conversion_says_so(source, unfinished, tmp_path):
    """Issue 21: after a kill during the final write, the rerun said "already holds this
    conversion" although it was the one that completed it."""
    import subprocess
    import sys

    for name in ("config.json", INDEX):  # killed before the progress file was removed
        (unfinished / name).write_text("{}")
    dsv4 = [sys.executable, "-m", "mlx_dsv4.cli", "convert", str(source), str(unfinished),
            "--shard-size", str(SHARD)]
    first = subprocess.run(dsv4, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"Completed the conversion in {unfinished}: the 5 shard(s)"), first.stdout
    again = subprocess.run(dsv4, capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == f"{unfinished} already holds this conversion."
