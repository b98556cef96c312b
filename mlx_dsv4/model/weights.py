"""Load a converted MLX model directory: config -> Model -> nn.quantize -> strict weights.

The directory holds `config.json` (with an mlx-lm style `"quantization"` block when weights are
quantized), `model-0000k-of-0000N.safetensors` shards and their index. Tensor names equal the
model's parameter paths, so loading is a dictionary match; a missing, unexpected or misshapen
tensor is an error that names it. Only this module knows the MLX directory format.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ConfigError, ModelArgs, list_names, load_json
from .model import Model
from .v41 import Model41

INDEX = "model.safetensors.index.json"
log = logging.getLogger(__name__)


class LoadError(ValueError):
    """A model directory that does not match the model its config describes."""


def shard_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        names = sorted(set(load_json(index, LoadError).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LoadError(f"{path}: shard(s) named in {INDEX} are missing: {', '.join(missing)}.")
        return [path / n for n in names]
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise LoadError(f"{path} holds no model*.safetensors shards: is it a converted model?")
    return files


def quantization_predicate(quant: dict, weights: dict):
    """nn.quantize predicate for an mlx-lm style `"quantization"` block.

    A per-module entry (dict of group_size/bits/mode, or false) wins; otherwise a module is
    quantized with the block's defaults when its `.scales` tensor exists.
    """
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path: str, module: nn.Module):
        if path in quant:
            return quant[path]
        if not hasattr(module, "to_quantized"):
            return False
        return dict(defaults) if f"{path}.scales" in weights else False

    return predicate


def check_tensors(model: nn.Module, weights: dict[str, mx.array]):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {list_names(missing, 8)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {list_names(extra, 8)}")
    for name in sorted(set(expected) & set(weights)):
        if tuple(expected[name].shape) != tuple(weights[name].shape):
            problems.append(f"{name} has shape {tuple(weights[name].shape)}, the model expects "
                            f"{tuple(expected[name].shape)}")
    if problems:
        raise LoadError("Weights do not match the model: " + "; ".join(problems) + ".")



def load_model(path: str | Path, lazy: bool = False, expert_memory: int | None = None,
               prefetch: bool = False, splits: list[range] | None = None) -> Model:
    """Build the model of a converted directory and load its weights strictly.

    Under `mlx.launch` with several ranks this is rank 0's `pipeline.PipelineModel`, holding the
    layers `splits[0]` of the planner's split (`Plan.splits`; ranks > 0 run `rank.follow`). With `expert_memory` (bytes), the routed experts stay on disk:
    they are read on demand into a cache of that size (`experts_stream`), the rest of the
    weights is loaded as usual; the store is `model.expert_store`. `prefetch` reads the next
    layer's guessed experts ahead (off by default: on random weights it read more than it
    saved, see experts_stream).
    """
    from ..launch import launched

    path = Path(path)
    if launched():
        from .pipeline import launched_group

        if (group := launched_group()) is not None:  # several ranks: this one holds some layers
            if expert_memory is not None:
                raise LoadError("Pipeline mode keeps every routed expert in memory: drop --expert-memory.")
            if splits is None:
                raise LoadError("Under mlx.launch each rank loads its share of the layers: plan the "
                                "split first (plan.plan_context) and pass its `splits`.")
            return load_pipeline(path, group, splits, lazy=lazy)
    args = ModelArgs.from_file(path)
    shards = shard_files(path)
    model = Model41(args) if args.is_v41 else Model(args)

    def stream_experts(weights):
        from .experts_stream import ExpertStore, attach

        attach(model, path, shards, expert_memory, prefetch)
        return {k: v for k, v in weights.items() if not ExpertStore.owns(k)}

    _install(model, args, _read(shards), stream_experts if expert_memory is not None else None)
    if args.engram_layer_ids:
        attach_engram(model, path)
    if not lazy:
        mx.eval(model.parameters())
        model.fuse()
    return model


def attach_engram(model, path: Path, layers=None) -> None:
    """Give a V4.1 model its Engram hash (from the token map) and each Engram layer the file
    of its table: rows are read from there on demand, the table is never loaded. `layers`: the
    layers the module holds (a pipeline stage), by default all."""
    from .engram import EngramFile, EngramHash, load_token_map, table_file

    args = model.args
    try:
        model.engram_hash = EngramHash(args, load_token_map(path))
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from e
    for layer, rows in zip(args.engram_layer_ids, args.engram_num_embeddings):
        if layers is not None and layer not in layers:
            continue
        f = path / table_file(layer)
        if not f.exists():
            raise LoadError(f"{path}: the Engram table of layer {layer} ({table_file(layer)}) is "
                            "missing; convert the checkpoint again.")
        try:
            table = EngramFile(f, args.engram_head_dim)
        except (OSError, ValueError) as e:
            raise LoadError(str(e)) from e
        if table.rows != rows:
            raise LoadError(f"{f} holds {table.rows:,} rows, the config gives layer {layer} {rows:,}.")
        model.layers[layer].engram.table = table


def load_part(path: str | Path, module: nn.Module, keep, lazy: bool = False) -> nn.Module:
    """Load into `module` the tensors `keep(name)` selects, strictly: a pipeline rank's layers.

    Only the shards the index maps those names to are opened, and `mx.load` reads a tensor only
    when it is evaluated, so a rank reads its own layers' bytes and no others.
    """
    path = Path(path)
    shards = shard_files(path)
    if (path / INDEX).exists():
        wanted = {f for n, f in load_json(path / INDEX, LoadError)["weight_map"].items() if keep(n)}
        shards = [f for f in shards if f.name in wanted]
    _install(module, ModelArgs.from_file(path), _read(shards, keep))
    if not lazy:
        mx.eval(module.parameters())
    return module


def load_pipeline(path: str | Path, group, splits: list[range], lazy: bool = False):
    """This rank's part of a converted model: `PipelineModel` on rank 0, a `Stage` elsewhere,
    holding the layers `splits[rank]` (the planner's cut, the same on every rank)."""
    from .pipeline import PipelineError, PipelineModel, Stage

    path = Path(path)
    args = ModelArgs.from_file(path)
    rank = group.rank()
    if len(splits) != group.size() or splits[0].start != 0 or splits[-1].stop != args.num_hidden_layers:
        raise PipelineError(f"A split of {args.num_hidden_layers} layers over {group.size()} ranks "
                            f"is needed, not {splits}.")
    bad = [r.start for r in splits[1:] if r.start not in args.pipeline_cuts()]
    if bad:
        raise PipelineError(f"A stage cannot start at layer {bad[0]}: later layers read the pools "
                            f"of earlier ones; cut at {sorted(args.pipeline_cuts())}.")
    stage = Stage(args, splits[rank], first=rank == 0)
    load_part(path, stage, stage.owns, lazy=lazy)
    if any(i in args.engram_layer_ids for i in stage.indices):
        attach_engram(stage, path, stage.indices)
    if not lazy:
        stage.fuse()
    if rank > 0:
        return stage
    model = PipelineModel(stage, args, group, splits)
    atexit.register(model.close)  # the workers stop with rank 0, so mlx.launch returns
    return model


def _read(shards: list[Path], keep=None) -> dict[str, mx.array]:
    """The tensors of `shards` (those `keep(name)` selects), lazily: a tensor not loaded into
    a module is never read."""
    weights: dict[str, mx.array] = {}
    for f in shards:
        weights.update({k: v for k, v in mx.load(str(f)).items() if keep is None or keep(k)})
    return weights


def _install(module: nn.Module, args: ModelArgs, weights: dict[str, mx.array], prepare=None):
    """Quantize `module` as the checkpoint is, then load `weights` into it strictly.
    `prepare(weights)`, run after quantizing, may change the module and returns the weights to
    load. Only the module keeps references afterwards, so fuse() frees as it goes."""
    if args.quantization:
        nn.quantize(module, class_predicate=quantization_predicate(args.quantization, weights))
    if prepare is not None:
        weights = prepare(weights)
    check_tensors(module, weights)
    module.load_weights(list(weights.items()), strict=False)


def model_dirs() -> list[Path]:
    """Where converted models are looked up by the repo id they came from."""
    env = os.environ.get("DSV4_MODELS")
    roots = env.split(os.pathsep) if env else ["~/models", "~/.cache/mlx-dsv4"]
    return [Path(r).expanduser() for r in roots]


def resolve_model(name: str | Path) -> Path:
    """A converted directory, given its path or the Hugging Face id it was converted from."""
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        cfg = load_json(config) if config.exists() else {}
        if "mlx_dsv4" not in cfg and cfg.get("quantization_config", {}).get("quant_method") == "fp8":
            raise LoadError(f"{path} is an original FP8/FP4 checkpoint, not a converted one. "
                            f"Convert it once with:\n  dsv4 convert {path} {path}-mlx-attn4")
        return path
    for root in model_dirs():
        for d in sorted(root.glob("*/config.json")) if root.is_dir() else []:
            try:
                meta = load_json(d).get("mlx_dsv4") or {}
            except (OSError, ConfigError) as e:  # one broken directory must not hide the others
                log.warning("Warning: skipping %s: %s", d.parent, e)
                continue
            if isinstance(meta, dict) and meta.get("source") == str(name):
                return d.parent
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        slug = str(name).split("/")[-1].lower()
        raise LoadError(f"{name} has not been converted yet (looked in "
                        f"{', '.join(map(str, model_dirs()))}). Convert it once with:\n"
                        f"  dsv4 convert {name} ~/models/{slug}-attn4")
    raise LoadError(f"{name}: no such model directory.")


def load(path: str | Path, lazy: bool = False, expert_memory: int | None = None,
         splits: list[range] | None = None):
    """`(model, tokenizer)` for a converted directory (see `load_model` for `expert_memory` and
    `splits`)."""
    from ..text.tokenizer import Tokenizer

    model = load_model(path, lazy=lazy, expert_memory=expert_memory, splits=splits)
    return model, Tokenizer.from_dir(Path(path))
