"""Continuous batching (issue 13): each request's tokens are those it gets alone, whatever joins
or leaves the batch around it; a cancelled request frees its slot within a step; a server that
batches answers or cleanly refuses a burst of 100 requests and stays healthy."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import mlx.core as mx
import numpy as np
import pytest

from conftest import build_model
from fakes import ByteTokenizer
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.generation.batch import DONE, Batcher, Cancelled, Request
from mlx_dsv4.generation.generate import Chunk, stream_generate
from mlx_dsv4.generation.prefill import ContextError
from mlx_dsv4.serve.app import create_app
from mlx_dsv4.serve.engine import Engine, Job
from mlx_dsv4.serve.protocol import ServerConfig
from mlx_dsv4.synthetic import random_weights, tiny_config
from test_server import EOS, M, OFF, TOOLS, VOCAB, Running, encoding, script, tokenizer  # noqa: F401

TOK = ByteTokenizer()
CONTEXT = 1024


@pytest.fixture(scope="module")
def model(tiny_args, tiny_official):
    return build_model(tiny_args, tiny_official)


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 256, n).tolist()


def force(token: int):
    """A per-request constraint: only `token` may follow."""
    def proc(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == token, logits, -mx.inf)
    return proc


# Mixed lengths: one token, inside the window, past it with a dense pool, past top-k (sparse).
CASES = [
    (prompt(1, 0), dict(max_tokens=8)),
    (prompt(150, 1), dict(max_tokens=30, logprobs=3)),
    (prompt(40, 2), dict(max_tokens=25, temperature=0.8, seed=3)),
    (prompt(300, 3), dict(max_tokens=12, repetition_penalty=1.3, stop=["zz"])),
    (prompt(7, 4), dict(max_tokens=6, logits_processors=[force(65)])),
    (prompt(90, 5), dict(max_tokens=20, temperature=1.0, top_k=5, seed=11, logprobs=2)),
]


def alone(model, ids, kw):
    return list(stream_generate(model, TOK, ids, max_context=CONTEXT, prefill_chunk=64, **kw))


def run_batch(batcher, cases, arrivals):
    """Add case j at step arrivals[j]; step until all are done; each case's sink items."""
    outs = [[] for _ in cases]
    step = 0
    while step <= max(arrivals) or batcher.busy:
        for j, (ids, kw) in enumerate(cases):
            if arrivals[j] == step:
                batcher.add(Request(ids, outs[j].append, **kw))
        batcher.step()
        step += 1
        assert step < 2000
    return outs


def test_batched_equals_alone_with_staggered_arrivals(model):
    expected = [alone(model, ids, kw) for ids, kw in CASES]
    batcher = Batcher(model, TOK, max_batch=3, max_context=CONTEXT, prefill_chunk=64)
    outs = run_batch(batcher, CASES, arrivals=[0, 1, 1, 5, 9, 30])
    for want, got in zip(expected, outs):
        assert got[-1] is DONE and got.count(DONE) == 1
        got = got[:-1]
        assert [c.token for c in got] == [c.token for c in want]
        assert "".join(c.text for c in got) == "".join(c.text for c in want)
        assert (got[-1].finish_reason, got[-1].stop) == (want[-1].finish_reason, want[-1].stop)
        assert [c.logprob for c in got] == [c.logprob for c in want]
        assert [c.top_logprobs for c in got] == [c.top_logprobs for c in want]
        assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in want]
    assert [c.token for c in outs[4][:-1]] == [65] * 6  # its processor, and no one else's
    assert not batcher.active and not batcher.waiting


def test_a_prompt_another_request_prefilled_is_reused_and_decodes_the_same(model):
    from mlx_dsv4.generation.prompt_cache import PromptCache

    cache = PromptCache("test", max_bytes=1 << 30)
    first, second = prompt(200, 7), prompt(200, 7) + prompt(30, 8)
    batcher = Batcher(model, TOK, max_batch=2, max_context=CONTEXT, prefill_chunk=64, prompt_cache=cache)
    a, b = run_batch(batcher, [(first, dict(max_tokens=4)), (second, dict(max_tokens=12))], [0, 20])
    assert a[0].reused_tokens == 0 and b[0].reused_tokens == 199  # all but the first's last token
    assert [c.token for c in b[:-1]] == [c.token for c in alone(model, second, dict(max_tokens=12))]


def test_an_eagerly_decoding_model_batches_too(tiny_args, tiny_official):
    """Experts streamed from disk make the model decode eagerly (no compiled MoE); the batch then
    runs its shared halves eagerly as well, and each request still gets its own tokens."""
    eager = build_model(tiny_args, tiny_official)
    eager.compiled_decode = False
    cases = CASES[1:4]
    expected = [alone(eager, ids, kw) for ids, kw in cases]
    outs = run_batch(Batcher(eager, TOK, max_batch=3, max_context=CONTEXT, prefill_chunk=64), cases, [0, 0, 2])
    for want, got in zip(expected, outs):
        assert [c.token for c in got[:-1]] == [c.token for c in want]
        # Summed in another order than the eager attention (ring order): equal to fp32 rounding.
        assert np.allclose([c.logprob or 0 for c in got[:-1]], [c.logprob or 0 for c in want], atol=1e-4)


def test_cancelled_request_leaves_within_a_step_and_frees_its_slot(model):
    batcher = Batcher(model, TOK, max_batch=2, max_context=CONTEXT, prefill_chunk=64)
    flag = {"a": False}
    a, b, c = [], [], []
    ra = batcher.add(Request(prompt(20, 1), a.append, max_tokens=50, cancelled=lambda: flag["a"]))
    batcher.add(Request(prompt(30, 2), b.append, max_tokens=12))
    rc = batcher.add(Request(prompt(10, 3), c.append, max_tokens=5))
    while len(a) < 3:
        batcher.step()
    assert rc in batcher.waiting and ra.cache is not None
    flag["a"] = True
    batcher.step()
    assert isinstance(a[-1], Cancelled) and ra.cache is None and ra not in batcher.active
    assert rc in batcher.active  # the freed slot went to the waiting request at once
    while batcher.busy:
        batcher.step()
    assert [x.token for x in b[:-1]] == [x.token for x in alone(model, prompt(30, 2), dict(max_tokens=12))]
    assert [x.token for x in c[:-1]] == [x.token for x in alone(model, prompt(10, 3), dict(max_tokens=5))]


def test_a_refused_request_is_told_why_and_the_batch_goes_on(model):
    batcher = Batcher(model, TOK, max_batch=4, max_context=64, largest_context=4096)
    long, bad, ok = [], [], []
    batcher.add(Request(prompt(60, 1), long.append, max_tokens=10))
    batcher.add(Request([5, 300], bad.append, max_tokens=2))
    batcher.add(Request(prompt(5, 2), ok.append, max_tokens=3))
    while batcher.busy:
        batcher.step()
    assert len(long) == 1 and isinstance(long[0], ContextError) and "4,096 tokens" in str(long[0])
    assert len(bad) == 1 and "Token id 300 at position 1" in str(bad[0])
    assert ok[-1] is DONE and ok[-2].finish_reason == "length" and len(ok) == 4


# ----- through the HTTP server ------------------------------------------------------------------

def tiny_full_vocab():
    args = ModelArgs.from_dict(tiny_config(vocab_size=VOCAB, num_hidden_layers=2, compress_ratios=[4, 128, 0]))
    return build_model(args, random_weights(args, seed=0))


@pytest.fixture(scope="module")
def served(tokenizer, encoding):  # noqa: F811
    net = tiny_full_vocab()
    batcher = Batcher(net, tokenizer, max_batch=4, max_context=512, prefill_chunk=64)
    engine = Engine(lambda: batcher, max_queue=16, max_batch=4).start()
    assert engine.loaded.wait(60) and engine.error is None
    config = ServerConfig(model_id=M, tokenizer=tokenizer, max_context=512, encoding=encoding)
    server = Running(create_app(engine, config))
    server.engine, server.batcher = engine, batcher
    yield server
    server.close()
    engine.stop()


def body(i: int, **kw) -> dict:
    return {"model": M, "messages": [{"role": "user", "content": f"Request number {i}" + " more" * (i % 7)}],
            "max_tokens": 3 + i % 4, "temperature": 0, **OFF, **kw}


def test_a_burst_of_100_requests_is_answered_or_refused_and_none_is_lost(served):
    async def burst():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            # Every other one streams: its reply is the whole event stream, read to the end.
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body(i, stream=i % 2 == 1))
                                          for i in range(100)))

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429} and len(codes) == 100
    assert codes.count(200) >= 16  # at least a full queue
    for i, r in enumerate(replies):
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error"
        elif i % 2:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(served.url + "/health", timeout=10).json() == {"status": "ok"}
    assert served.batcher.peak >= 3  # they did decode together
    # Greedy replies are those the request gets alone, whatever shared the batch with it.
    for i, r in list(enumerate(replies))[:40:6]:  # the non-streamed ones
        if r.status_code == 200:
            again = httpx.post(served.url + "/v1/chat/completions", json=body(i), timeout=60).json()
            assert again["choices"][0]["message"] == r.json()["choices"][0]["message"]


def test_jobs_that_chain_generations_and_constrained_replies_batch(served):
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": schema}}

    async def mixed():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            forced = [client.post("/v1/chat/completions", json=body(
                i, max_tokens=4, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
                for i in range(2)]
            js = [client.post("/v1/chat/completions", json=body(i, max_tokens=40, response_format=fmt,
                                                                   temperature=1.0, seed=i))
                  for i in range(4)]
            return await asyncio.gather(*forced, *js)

    replies = asyncio.run(mixed())
    assert [r.status_code for r in replies] == [200] * 6
    for r in replies[:2]:
        assert r.json()["usage"]["completion_tokens"] == 4
    for r in replies[2:]:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert set(json.loads(choice["message"]["content"])) == {"n"}


def test_a_job_whose_reader_leaves_frees_its_slot_within_a_step(served):
    engine, batcher = served.engine, served.batcher

    async def read_two():
        chunks = engine.submit(Job(served_prompt(), {"max_tokens": 400}))
        async for chunk in chunks:
            if chunk.generation_tokens == 2:
                break
        await chunks.aclose()  # the reader goes away: the job is cancelled
        return batcher.steps

    left_at = asyncio.run(read_two())
    deadline = time.monotonic() + 30
    while batcher.busy or engine._running:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert batcher.steps - left_at <= 2


def served_prompt() -> list[int]:
    return prompt(30, 9)


def test_plan_shows_a_batch_and_refuses_one_that_does_not_fit():
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "flash", "--recipe", "q4", "--context", "262144", "--memory", "256GB",
                             "--batch", "8"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0 and "8 sequences" in ok.output and "decode activations (8 rows)" in ok.output
    no = runner.invoke(app, ["plan", "flash", "--recipe", "q4", "--context", "262144", "--memory", "256GB",
                             "--batch", "64"], env={"COLUMNS": "200"})
    assert no.exit_code == 2 and "does not fit" in no.output


class BrokenBatch:
    """A batch backend whose second step breaks: the engine must fail its jobs, not hang."""

    max_context = 4096

    def __init__(self):
        self.requests, self.steps = [], 0

    @property
    def busy(self):
        return bool(self.requests)

    def add(self, request):
        self.requests.append(request)

    def step(self):
        if self.steps == 0 and len(self.requests) < 3:
            return  # the three jobs' requests are on their way
        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("the device went away")
        for r in self.requests:
            r.sink(Chunk(text="a", token=97, prompt_tokens=len(r.ids), generation_tokens=1))

    def fail(self, error):
        requests, self.requests = self.requests, []
        for r in requests:
            r.leave(error)


def test_a_broken_batch_step_fails_its_jobs_and_the_engine_goes_on():
    backend = BrokenBatch()
    engine = Engine(lambda: backend, max_batch=4).start()

    async def run(n):
        async def one(i):
            got = []
            try:
                async for chunk in engine.submit(Job([1, 2, 3 + i], {"max_tokens": 5})):
                    got.append(chunk.text)
            except RuntimeError as e:
                return got, str(e)
            return got, None
        return await asyncio.gather(*(one(i) for i in range(n)))

    try:
        assert engine.loaded.wait(30)
        results = asyncio.run(run(3))
        assert results == [(["a"], "the device went away")] * 3
        assert backend.steps == 2 and not backend.requests and engine._thread.is_alive()
    finally:
        engine.stop()


def test_serve_batches_with_max_batch_and_serves_one_at_a_time_with_1(selftest_model):
    from mlx_dsv4.generation.session import Session
    from mlx_dsv4.serve import create_server

    from mlx_dsv4.plan import PlanError

    with pytest.raises(PlanError, match=r"100000000 sequences of 256 tokens .* fewer sequences"):
        create_server(selftest_model, max_batch=10**8, max_context=256, wire_memory=False)
    for max_batch, kind in ((3, Batcher), (1, Session)):
        engine, _, config = create_server(selftest_model, max_batch=max_batch, max_context=256,
                                          wire_memory=False)
        engine.start()
        try:
            assert engine.loaded.wait(60) and engine.error is None
            assert isinstance(engine.backend, kind) and engine.max_batch == max_batch
            if kind is Batcher:
                assert engine.backend.max_batch == 3 and engine.backend.max_context == 256
        finally:
            engine.stop()


# ----- an agent's turns through a batching server (issue 24) ------------------------------------

class ScriptedBatch(Batcher):
    """A batch of the real tiny model whose replies are scripted (test_server's `script`): the
    prompt is prefilled and every reply token fed back through real caches, as a model's would
    be; a last logits processor only picks which token comes next."""

    def add(self, request):
        prompt = self.tokenizer.decode(request.ids).removeprefix("<｜begin▁of▁sentence｜>")
        reply = self.tokenizer.encode(script(prompt), allow_control=True) + [EOS]

        def pick(tokens, logits):
            t = reply.pop(0) if reply else EOS
            return mx.where(mx.arange(logits.shape[-1]) == t, 0.0, -mx.inf)[None]

        request.extra_processors.append(pick)
        return super().add(request)


@pytest.fixture(scope="module")
def agent_server(tokenizer, encoding):  # noqa: F811
    from mlx_dsv4.generation.prompt_cache import PromptCache

    batcher = ScriptedBatch(tiny_full_vocab(), tokenizer, max_batch=4, max_context=1024, prefill_chunk=64,
                            prompt_cache=PromptCache("agent", interval=128))
    engine = Engine(lambda: batcher, max_queue=16, max_batch=4).start()
    assert engine.loaded.wait(60) and engine.error is None
    server = Running(create_app(engine, ServerConfig(model_id=M, tokenizer=tokenizer, max_context=1024,
                                                     encoding=encoding)))
    yield server
    server.close()
    engine.stop()


def test_a_chat_tool_turn_reads_only_the_tool_result(agent_server):
    # With tools, V4 keeps the reasoning in the history (protocol A9): the next prompt holds the
    # reply exactly as generated, EOS included, and all of it comes from the state kept after it.
    client = agent_server.client()
    messages = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    first = client.chat.completions.create(model=M, messages=messages, tools=TOOLS, max_tokens=200,
                                           extra_body={"thinking": {"type": "enabled"}})
    reply = first.choices[0].message
    (call,) = reply.tool_calls
    assert call.function.name == "get_weather" and reply.reasoning_content
    messages += [{"role": "assistant", "content": reply.content, "reasoning_content": reply.reasoning_content,
                  "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    second = client.chat.completions.create(model=M, messages=messages, tools=TOOLS, max_tokens=50,
                                            extra_body={"thinking": {"type": "enabled"}})
    assert second.choices[0].message.content
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == held < second.usage.prompt_tokens


def test_a_responses_tool_turn_reads_only_the_tool_result(agent_server):
    # Codex's way: store false, the reasoning handed back sealed, then the call and its output.
    client = agent_server.client()
    weather = {"type": "function", **{k: TOOLS[0]["function"][k] for k in ("name", "description", "parameters")}}
    ask = dict(model=M, tools=[weather], store=False, reasoning={"effort": "high"},
               include=["reasoning.encrypted_content"], max_output_tokens=200)
    items = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    first = client.responses.create(input=items, **ask)
    assert [o.type for o in first.output] == ["reasoning", "function_call"]
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": first.output[1].call_id, "output": "Sunny"})
    second = client.responses.create(input=items, **ask)
    held = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == held < second.usage.input_tokens
