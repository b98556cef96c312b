"""Grammar-constrained replies (issue 12): DSML tool blocks and JSON, from the grammar alone, through
the real generator with a babbling model, and through a live server on a tiny random V4 model.

A "babbling" model draws fresh random logits at every step, so unconstrained it writes noise; the
tests show the constraint turns every seed into a parseable, schema-valid call or JSON value.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import openai
import pytest

from mlx_dsv4.config import ModelArgs
from mlx_dsv4.synthetic import tiny_config
from mlx_dsv4.text import chat_format
from mlx_dsv4.generation import constrain
from mlx_dsv4.generation.generate import stream_generate
from mlx_dsv4.serve import grammar
from mlx_dsv4.serve.schema import APIError
from test_server import M, OFF, WEATHER, encoding, tiny, tokenizer, tool  # noqa: F401

pytest.importorskip("llguidance", reason="constrained decoding uses llguidance")

VOCAB, EOS = 129280, 1
PICK = tool("pick", {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                     "n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
            ["color", "n"])
NOTE = tool("note", {"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}}},
            ["text"])
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


def valid_pick(args: dict) -> bool:
    return (set(args) <= {"color", "n", "ok"} and args.get("color") in ("red", "green", "blue")
            and type(args.get("n")) is int and 0 <= args["n"] <= 9
            and ("ok" not in args or isinstance(args["ok"], bool)))


def valid_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) <= {"color", "n", "flags"}
            and value.get("color") in ("red", "green", "blue") and type(value.get("n")) is int
            and 0 <= value["n"] <= 9 and all(isinstance(f, bool) for f in value.get("flags", []))
            and len(value.get("flags", [])) <= 3)


@pytest.fixture(scope="module")
def ll(tokenizer):
    return constrain.grammar_tokenizer(tokenizer, VOCAB)


def accepts(ll, tokenizer, g: str, text: str) -> bool:
    """Whether every token of `text` is allowed in turn, and the grammar is then complete."""
    c = constrain.Constraint(ll, g)
    for t in tokenizer.encode(text, allow_control=True):
        if not c.allowed()[t]:
            return False
        c.matcher.consume_token(t)
    return c.done and c.allowed().nonzero()[0].tolist() == [EOS]


def block(*calls) -> str:
    return "\n\n" + chat_format.render_tool_calls(
        [{"function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls])


def test_tool_grammar_accepts_what_the_encoder_writes_and_nothing_else(ll, tokenizer):
    tools = [WEATHER, PICK, NOTE, tool("get_time")]
    g = grammar.tool_block(tools, ll)
    text = 'line "two" <b>bold</b> </tag> café ✓\n'
    for calls in [[("get_weather", {"city": "Paris", "days": 2})], [("get_weather", {"city": "Rome"})],
                  [("pick", {"color": "red", "n": 3, "ok": True})], [("get_time", {})],
                  [("note", {"text": text, "tags": [1, 2]})],
                  [("get_time", {}), ("pick", {"color": "blue", "n": 0})]]:
        assert accepts(ll, tokenizer, g, block(*calls)), calls
    for calls in [[("get_weather", {"days": 2})],  # a required key missing
                  [("get_weather", {"city": "Paris", "days": "two"})],  # a string for an integer
                  [("pick", {"color": "pink", "n": 3})], [("pick", {"color": "red", "n": 10})],
                  [("get_weather", {"city": "Paris", "when": "now"})],  # an undeclared key
                  [("get_weather", {"days": 2, "city": "Paris"})],  # out of declared order
                  [("nope", {})]]:
        assert not accepts(ll, tokenizer, g, block(*calls)), calls
    one = grammar.tool_block(tools, ll, parallel=False)
    assert not accepts(ll, tokenizer, one, block(("get_time", {}), ("get_time", {})))
    named = grammar.tool_block(tools, ll, name="pick")
    assert not accepts(ll, tokenizer, named, block(("get_time", {})))
    assert accepts(ll, tokenizer, named, block(("pick", {"color": "green", "n": 9})))


def test_unsupported_schemas_are_named(ll):
    for params, words in [({"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                           ["properties.a", '"not"']),
                          ({"anyOf": [{"type": "object"}]}, ["anyOf"]),
                          ({"type": "object", "properties": {"a": {"type": "string", "format": "colour"}}},
                           ["format", "colour"]),
                          ({"type": "array"}, ["type object"]),
                          ({"type": "object", "properties": {}, "required": ["x"]}, ["x"])]:
        with pytest.raises(APIError) as e:
            grammar.tool_block([tool("t") | {"function": {"name": "t", "parameters": params}}], ll)
        assert e.value.status == 400 and all(w in e.value.message for w in words), e.value.message
        assert e.value.param.startswith("tools[0].function.parameters")
    with pytest.raises(APIError) as e:
        grammar.json_reply({"type": "json_schema", "json_schema": {"schema": {"dependentSchemas": {}}}}, ll)
    assert "dependentSchemas" in e.value.message and e.value.param == "response_format.json_schema.schema"


class Babbler:
    """Writes `script` (token ids) first, then draws fresh random logits every step."""

    def __init__(self, script: list[int], prompt_len: int, seed: int):
        self.script, self.prompt_len, self.seed = script, prompt_len, seed
        self.args = ModelArgs.from_dict(tiny_config(vocab_size=VOCAB, eos_token_id=EOS))

    def __call__(self, ids, cache, last_only=False):
        cache[0].offset += ids.shape[1]
        k = cache[0].offset - self.prompt_len
        logits = 4 * mx.random.normal((1, 1, VOCAB), key=mx.random.key(self.seed * 100_003 + max(k, 0)))
        if 0 <= k < len(self.script):
            logits = logits.at[0, 0, self.script[k]].add(1e4)
        return logits


class NoDrafts:
    def observe(self, *args):
        raise AssertionError("a constrained reply was decoded speculatively")

    draft = observe


def babble(tokenizer, constraint, script: str = "", seed: int = 0, max_tokens: int = 200) -> str:
    prompt = tokenizer.encode("<｜User｜>go<｜Assistant｜>", allow_control=True)
    model = Babbler(tokenizer.encode(script, allow_control=True), len(prompt), seed)
    cache = [SimpleNamespace(offset=0, state=[])]
    # Asked to speculate, the generator decodes token by token: the grammar must see each one.
    chunks = list(stream_generate(model, tokenizer, prompt, cache=cache, max_tokens=max_tokens,
                                  temperature=1.0, seed=seed, logits_processors=[constraint],
                                  draft=2, drafter=NoDrafts()))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token == EOS
    return "".join(c.text for c in chunks)


def test_babbling_model_writes_valid_calls_under_the_constraint(ll, tokenizer):
    g = grammar.tool_block([PICK, WEATHER], ll, name="pick", parallel=False)
    for seed in range(10):
        text = babble(tokenizer, constrain.Constraint(ll, g), seed=seed)
        _, content, calls = chat_format.parse_reply(text, thinking=False)
        assert len(calls) == 1 and not content, (seed, text)
        assert calls[0].name == "pick" and valid_pick(json.loads(calls[0].arguments)), (seed, text)


def test_auto_constrains_only_the_block_after_reasoning(ll, tokenizer):
    # Reasoning and text are the model's own; from its `<｜DSML｜` on, the block is the grammar's.
    rest = grammar.BLOCK_OPEN.split(chat_format.DSML, 1)[1]
    g = grammar.tool_block([PICK], ll, parallel=False, start=rest)
    script = 'No JSON {here, no <tags> either.</think>Let me pick.\n\n<｜DSML｜'
    for seed in range(5):
        gate = grammar.AfterReasoning(tokenizer.token_to_id("</think>"), tokenizer.token_to_id("｜DSML｜"),
                                      tokenizer.decode)
        text = babble(tokenizer, constrain.Constraint(ll, g, gate=gate), script, seed)
        reasoning, content, calls = chat_format.parse_reply(text, thinking=True)
        assert reasoning == "No JSON {here, no <tags> either." and content == "Let me pick.", (seed, text)
        assert len(calls) == 1, (seed, text)
        assert valid_pick(json.loads(calls[0].arguments)), (seed, text)


def test_json_after_reasoning(ll, tokenizer):
    g = grammar.json_reply({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": True}}, ll)
    for seed in range(5):
        gate = grammar.AfterReasoning(tokenizer.token_to_id("</think>"))
        text = babble(tokenizer, constrain.Constraint(ll, g, gate=gate), "Not {json} yet</think>", seed)
        reasoning, _, content = text.partition("</think>")
        assert reasoning == "Not {json} yet" and valid_schema(json.loads(content)), (seed, text)


# ----- through the server, on a tiny random V4 model ---------------------------------------------

def test_required_and_named_calls_on_random_weights(tiny):
    c = tiny.client()
    for seed in range(20):
        named = seed % 2 == 1
        choice = {"type": "function", "function": {"name": "pick"}} if named else "required"
        r = c.chat.completions.create(model=M, messages=[{"role": "user", "content": f"go {seed}"}],
                                      tools=[WEATHER, PICK] if named else [PICK], tool_choice=choice,
                                      parallel_tool_calls=False, max_tokens=100, seed=seed,
                                      temperature=1.0, extra_body=OFF)
        calls = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, (seed, r)
        assert calls[0].function.name == "pick" and valid_pick(json.loads(calls[0].function.arguments))


def test_streamed_constrained_arguments_match_the_reply(tiny):
    c = tiny.client()
    kw = dict(model=M, messages=[{"role": "user", "content": "go"}], tools=[PICK], tool_choice="required",
              max_tokens=300, seed=3, temperature=1.0, extra_body=OFF)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls
    args: dict[int, str] = {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert [args[i] for i in sorted(args)] == [t.function.arguments for t in whole]
    assert all(valid_pick(json.loads(a)) for a in args.values())


def test_json_schema_on_random_weights(tiny):
    c = tiny.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "strict": True, "schema": SCHEMA}}
    for seed in range(20):
        r = c.chat.completions.create(model=M, messages=[{"role": "user", "content": f"json {seed}"}],
                                      response_format=fmt, max_tokens=100, seed=seed, temperature=1.0,
                                      extra_body=OFF)
        assert r.choices[0].finish_reason == "stop", (seed, r)
        assert valid_schema(json.loads(r.choices[0].message.content)), (seed, r)


def test_unsupported_schema_is_a_400(tiny):
    c = tiny.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=M, messages=[{"role": "user", "content": "go"}], extra_body=OFF,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"type": "object", "not": {}}}})
    assert '"not"' in e.value.body["message"] and e.value.body["code"] == "unsupported_schema"
    # With tool_choice auto an odd schema costs nothing: the model may not call that tool at all.
    odd = tool("odd", {"a": {"not": {"type": "string"}}})
    r = c.chat.completions.create(model=M, messages=[{"role": "user", "content": "go"}], tools=[odd],
                                  max_tokens=2, extra_body=OFF)
    assert r.choices[0].finish_reason == "length"


def test_grammar_tokenizer_is_built_once(tokenizer):
    assert constrain.grammar_tokenizer(tokenizer, VOCAB) is constrain.grammar_tokenizer(tokenizer, VOCAB)
