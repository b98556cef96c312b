"""Shared fixtures: a tiny random DeepSeek-V4 (every layer kind, real ratios and window)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Servers started by the tests keep their prompt cache in its default folder (under
# $XDG_CACHE_HOME): one of the run's own, never the user's ~/.cache. Subprocesses inherit it.
_CACHE_HOME = tempfile.TemporaryDirectory(prefix="dsv4-tests-cache-", ignore_cleanup_errors=True)
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME.name

from mlx_dsv4.config import ModelArgs  # noqa: E402
from mlx_dsv4.model.model import Model  # noqa: E402
from mlx_dsv4.synthetic import random_weights, tiny_config, to_model_weights  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_args(tiny_cfg) -> ModelArgs:
    return ModelArgs.from_dict(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_official(tiny_args) -> dict[str, np.ndarray]:
    """Official-named float32 weights of the tiny model."""
    return random_weights(tiny_args, seed=0)


def build_model(args: ModelArgs, official: dict[str, np.ndarray]) -> Model:
    model = Model(args)
    weights = to_model_weights(official)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


def decode(model, ids, compiled: bool, prompt: int, max_tokens: int | None = None, kv_bits=None):
    """Last-position logits of `ids[:, :prompt]` read at once, then one per token: (B, steps, V)."""
    from mlx_dsv4.model.cache import make_cache

    model.compiled_decode, model._decode_step = compiled, None
    cache = make_cache(model, batch=ids.shape[0], max_tokens=max_tokens, kv_bits=kv_bits)
    outs = [np.array(model(mx.array(ids[:, :prompt]), cache)[:, -1])]
    for t in range(prompt, ids.shape[1]):
        outs.append(np.array(model(mx.array(ids[:, t : t + 1]), cache)[:, -1]))
    model.compiled_decode = True
    return np.stack(outs, axis=1), cache


def conversions(official: Path, factory, shard_size: int):
    """`get(recipe)`: `official` converted with that recipe, once per module that asks."""
    from mlx_dsv4.convert import convert

    done: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in done:
            done[recipe] = factory.mktemp(recipe) / "out"
            convert(official, done[recipe], recipe=recipe, shard_size=shard_size)
        return done[recipe]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_args, tiny_official) -> Model:
    return build_model(tiny_args, tiny_official)


@pytest.fixture(scope="session")
def token_ids(tiny_args) -> np.ndarray:
    return np.random.default_rng(1).integers(0, tiny_args.vocab_size, (1, 640))


@pytest.fixture(scope="session")
def selftest_model(tmp_path_factory):
    """The selftest's tiny converted model (official format -> q4, byte tokenizer, encoder)."""
    from mlx_dsv4.selftest import MODEL_DIR, run_selftest

    work = tmp_path_factory.mktemp("selftest")
    report = run_selftest(work, log=lambda line: None)
    assert report.ok, report.summary()
    return work / MODEL_DIR
