"""Where checkpoints come from: a local directory, or a Hugging Face repo downloaded on demand.

`resolve` turns a path or repo id into a local directory, downloading with
`snapshot_download(allow_patterns=...)` (which resumes an interrupted download by itself) after
checking that the disk has room for the download plus what the caller will write.
`remote_headers` reads a repo's config and safetensors headers without downloading any weights,
which is what planning and `--dry-run` need. Every Hub call goes through an `api` object with
`HfApi`'s methods (`model_info`, `hf_hub_download`, `get_safetensors_metadata`,
`snapshot_download`), so tests pass a fake one.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

_REPO_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")


class HubError(ValueError):
    """A source that cannot be resolved or downloaded, with a sentence saying why."""


def is_local(source: str | Path) -> bool:
    return Path(source).exists()


def check_repo_id(source: str) -> None:
    if not _REPO_ID.match(str(source)):
        raise HubError(f"{source!r} is neither an existing directory nor a Hugging Face repo id "
                       "(owner/name, e.g. deepseek-ai/DeepSeek-V4-Flash).")


def default_api():
    from huggingface_hub import HfApi

    return HfApi()


def commit(repo_id: str, revision: str | None = None, *, api=None) -> str:
    """The commit a branch, tag or hash names now: everything after is pinned to it."""
    check_repo_id(repo_id)
    api = api or default_api()
    at = f" at revision {revision!r}" if revision else ""
    with _asking(f"{repo_id!r} is not a local directory; resolving it on the Hub{at}"):
        return api.model_info(repo_id, revision=revision).sha


def remote_headers(repo_id: str, revision: str, *, api=None):
    """`(config, {tensor: (file, dtype, shape)})` of a repo, from its headers alone."""
    api = api or default_api()
    with _asking(f"reading the config and safetensors headers of {repo_id}"):
        config = json.loads(Path(api.hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
    tensors = {}
    for fname, file_meta in meta.files_metadata.items():
        for name, info in file_meta.tensors.items():
            tensors[name] = (fname, info.dtype, tuple(info.shape))
    return config, tensors


def resolve(source: str | Path, revision: str | None, allow_patterns: tuple[str, ...], *,
            output_dir: Path | None = None,
            output_bytes: int = 0, api=None) -> Path:
    """A local directory as is; a repo id downloaded (resuming) once the disk space is checked.
    `allow_patterns` are fnmatch patterns (`*` spans folders), e.g. convert's SOURCE_FILES."""
    if is_local(source):
        if not Path(source).is_dir():
            raise HubError(f"{source} is a file; give the checkpoint's directory.")
        return Path(source)
    check_repo_id(str(source))
    api = api or default_api()
    patterns = list(allow_patterns)
    with _asking(f"listing the files of {source}"):
        planned = api.snapshot_download(str(source), revision=revision, allow_patterns=patterns,
                                        dry_run=True)
    download = sum(f.file_size or 0 for f in planned if f.will_download)
    needs = [(_hub_cache(), download)]
    if output_dir is not None:
        needs.append((Path(output_dir), output_bytes))
    require_space(needs, what=f"download {source} and write the conversion")
    with _asking(f"downloading {source} (rerun to resume)"):
        return Path(api.snapshot_download(str(source), revision=revision, allow_patterns=patterns))


def require_space(needs: list[tuple[Path, int]], what: str) -> None:
    """Refuse when a filesystem lacks room for the bytes to be written on it."""
    by_device: dict[int, list] = {}
    for path, n in needs:
        anchor = _existing(Path(path))
        entry = by_device.setdefault(anchor.stat().st_dev, [anchor, 0])
        entry[1] += n
    for anchor, n in by_device.values():
        free = shutil.disk_usage(anchor).free
        if n > free:
            raise HubError(f"Not enough disk space to {what}: {_gb(n)} needed on the filesystem of "
                           f"{anchor}, {_gb(free)} free.")


@contextmanager
def _asking(what: str):
    """Hub failures (not found, gated, offline...) come as many exception types: say what failed."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        raise HubError(f"{what} failed: {e}") from e


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
