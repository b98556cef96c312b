"""The DeepSeek-V4.1 encoding against DeepSeek's own encoder output, and how it is chosen.

Fixtures: tests/fixtures/encoding/v41 (see its README): DeepSeek's five golden prompts, cases
produced by running its released `encoding/encoding.py`, and the inputs it refuses. The encoder's
texts reach `render` the production way, through `load_encoding` on a stand-in
`encoding/encoding.py` written from the extracted constants.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_dsv4.text import chat_format as cf
from mlx_dsv4.text.chat_format import ChatFormatError, parse_reply, render, render_segments
from test_chat_format import encoder_source, feed_chunks, summary

FIXTURES = Path(__file__).parent / "fixtures" / "encoding" / "v41"
EFFORT = "Reasoning Effort: {} (range 1-100, the higher the value, the more thorough the reasoning)\n\n"
BOS, SYSTEM, EOS = "<｜begin▁of▁sentence｜>", "<｜System｜>", "<｜end▁of▁sentence｜>"


def write_model(path: Path, folder: str, file: str, model_type: str | None) -> Path:
    (path / "encoding").mkdir(parents=True, exist_ok=True)
    (path / "encoding" / file).write_text(encoder_source(folder), encoding="utf-8")
    if model_type:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def v41(tmp_path_factory) -> cf.Encoding:
    return cf.load_encoding(write_model(tmp_path_factory.mktemp("v41"), "v41", "encoding.py", "deepseek_v41"))


def call(data) -> tuple[list[dict], dict]:
    """A golden input as upstream's `load_cases` + `encode_case(case, thinking_mode="chat")` read it."""
    if isinstance(data, list):
        data = {"messages": data}
    messages = [dict(m) for m in data["messages"]]
    if "tools" in data:
        messages[0]["tools"] = data["tools"]
    return messages, dict(thinking=(data.get("thinking_mode") or "chat") == "thinking",
                          reasoning_effort=data.get("reasoning_effort"), context=data.get("context"))


def case_call(data: dict) -> tuple[list[dict], dict]:
    """A generated case: the keyword arguments of `encode_messages`."""
    return data["messages"], dict(thinking=data["thinking_mode"] == "thinking",
                                  reasoning_effort=data["reasoning_effort"], context=data.get("context"),
                                  drop_thinking=data.get("drop_thinking", True))


def load(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


GOLDEN = [f"test_{i}" for i in range(1, 5)]
CASES = sorted(p.name[: -len("_input.json")] for p in FIXTURES.glob("case_*_input.json"))


@pytest.mark.parametrize("name", GOLDEN + CASES)
def test_golden_prompt(v41, name):
    if name.startswith("test"):
        messages, kwargs = call(load(f"test_input_{name[-1]}.json"))
        expected = (FIXTURES / f"test_output_{name[-1]}.txt").read_bytes()
    else:
        messages, kwargs = case_call(load(f"{name}_input.json"))
        expected = (FIXTURES / f"{name}_output.txt").read_bytes()
    prompt = render(messages, encoding=v41, **kwargs)
    assert prompt.encode("utf-8") == expected
    assert "".join(t for t, _ in render_segments(messages, encoding=v41, **kwargs)) == prompt


def test_golden_count():
    assert len(GOLDEN) == 4 and len(CASES) == 36  # test 5 holds images: see below


def test_images_are_refused(v41):
    messages, kwargs = call(load("test_input_5.json"))
    with pytest.raises(ChatFormatError, match="image"):
        render(messages, encoding=v41, **kwargs)
    # Without its images, test 5's text renders as the reference wrote it.
    texts = [p["text"] for p in messages[1]["content"] if p["type"] == "text"]
    text_only = [messages[0], {"role": "user", "content": "\n\n<｜deepseek_image｜>\n\n".join(texts)}]
    assert render(text_only, encoding=v41, **kwargs).encode() == (FIXTURES / "test_output_5.txt").read_bytes()


@pytest.mark.parametrize("entry", load("refused.json"), ids=lambda e: f"{e['error']}:{e['message'][:40]}")
def test_refused_inputs(v41, entry):
    messages, kwargs = case_call(entry["input"])
    with pytest.raises(ChatFormatError):
        render(messages, encoding=v41, **kwargs)


def test_constants_read_from_encoder_file(v41):
    constants = load("constants.json")
    assert dict(v41.constants) == constants and list(v41.constants) == list(constants)
    assert v41.version == cf.V41 and v41.system == SYSTEM
    assert v41.efforts == {None: 75, "low": 50, "high": 75, "max": 100}
    assert (v41.block_name, v41.invoke_tag, v41.param_tag) == (" calls", " invoke", " parameter")
    assert v41.param_tpl == load("function_constants.json")["encode_arguments_to_dsml.p_dsml_template"]


def test_effort_line(v41):
    hi = [{"role": "user", "content": "hi"}]
    tail = "<｜User｜>hi<｜Assistant｜><think>"
    for effort, budget in ((None, 75), ("low", 50), ("high", 75), ("max", 100), (1, 1), (42, 42), (100, 100)):
        assert render(hi, thinking=True, reasoning_effort=effort, encoding=v41) == \
            BOS + SYSTEM + EFFORT.format(budget) + tail
    # Chat mode: no effort line and no System token without a system message; still validated.
    assert render(hi, thinking=False, reasoning_effort=7, encoding=v41) == BOS + "<｜User｜>hi<｜Assistant｜></think>"
    for bad in (0, 101, True, 1.5, "75", "medium", "none"):
        with pytest.raises(ChatFormatError, match="integer from 1 to 100 or one of low, high, max"):
            render(hi, thinking=False, reasoning_effort=bad, encoding=v41)


def test_effort_on_scale(v41):
    """API names V4.1 does not define sit on its scale; numbers and its own names pass through."""
    scale = {name: cf.effort_on_scale(v41, name) for name in
             ("minimal", "low", "medium", "high", "xhigh", "max", "ultra", None)}
    assert scale == {"minimal": 25, "low": 50, "medium": 63, "high": 75, "xhigh": 88, "max": 100,
                     "ultra": 100, None: 75}
    assert cf.effort_on_scale(v41, 37) == 37
    for bad in ("none", "huge", 0, 101, True, 2.5):
        with pytest.raises(ChatFormatError, match="1 to 100"):
            cf.effort_on_scale(v41, bad)
    # The pre-release alias table (low 25, high 50, xhigh 75, max 100) keeps its own xhigh.
    early = cf.encoding_from_source(encoder_source("v41").replace(
        "{'low': 50, 'high': 75, 'max': 100}", "{'low': 25, 'high': 50, 'xhigh': 75, 'max': 100}"))
    assert [cf.effort_on_scale(early, n) for n in ("minimal", "medium", "xhigh", "ultra")] == [1, 38, 75, 100]


def test_v41_tool_calls_round_trip(v41):
    """What the model writes in the V4.1 spelling parses back to the calls that were rendered."""
    calls = [{"id": "a", "type": "function", "function": {"name": "write", "arguments":
                                                          '{"path": "a.txt", "n": [1, {"b": null}]}'}},
             {"id": "b", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "reasoning_content": "plan", "content": "Doing it.", "tool_calls": calls}]
    prompt = render(messages, thinking=True, encoding=v41)
    turn = prompt.split("<｜Assistant｜><think>", 1)[1]
    assert "<｜DSML｜ calls>" in turn and '<｜DSML｜ invoke name="write">' in turn
    reasoning, content, parsed = parse_reply(turn, thinking=True)
    assert (reasoning, content) == ("plan", "Doing it.")
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == \
        [("write", {"path": "a.txt", "n": [1, {"b": None}]}), ("now", {})]
    assert cf.render_tool_calls(calls, v41).startswith("<｜DSML｜ calls>\n<｜DSML｜ invoke name=\"write\">\n"
                                                       '<｜DSML｜ parameter name="path" string="true">a.txt')


BLOCK41 = ('<｜DSML｜ calls>\n<｜DSML｜ invoke name="get_weather">\n'
           '<｜DSML｜ parameter name="city" string="true">Paris </b> "x"</｜DSML｜ parameter>\n'
           '<｜DSML｜ parameter name="days" string="false">2</｜DSML｜ parameter>\n</｜DSML｜ invoke>\n'
           '<｜DSML｜ invoke name="get_time">\n\n</｜DSML｜ invoke>\n</｜DSML｜ calls>')


def test_parser_reads_v41_blocks_however_split():
    text = "Two calls.</think>Checking.\n\n" + BLOCK41 + EOS
    whole = summary(feed_chunks(text, [], True))
    assert whole == ("Two calls.", "Checking.", [(0, "get_weather", '{"city": "Paris </b> \\"x\\"", "days": 2}', ()),
                                                 (1, "get_time", "{}", ())], [])
    for cut in range(len(text) + 1):
        assert summary(feed_chunks(text, [cut], True)) == whole, cut
    assert summary(feed_chunks(text, list(range(1, len(text))), True)) == whole


def test_parser_reports_a_v41_call_cut_anywhere():
    text = "Plan.</think>\n\n" + BLOCK41
    for n in range(len(text) + 1):
        _, _, calls, errors = summary(feed_chunks(text[:n], [], True))
        assert len(calls) == text[:n].count("</｜DSML｜ invoke>")
        if "<｜DSML｜ i" in text[:n].rsplit("</｜DSML｜ invoke>", 1)[-1]:
            assert len(errors) == 1 and errors[0][3], n  # begun, not closed: reported, never dropped
        else:
            assert errors == [], n


# ----- choosing the encoder ----------------------------------------------------------------------

def test_encoder_chosen_by_file_and_model_type(tmp_path):
    assert cf.load_encoding(write_model(tmp_path / "a", "v41", "encoding.py", None)).version == cf.V41
    assert cf.load_encoding(write_model(tmp_path / "b", "v0731", "encoding_dsv4.py", "deepseek_v4")).version == "0731"
    # A converted folder may nest the V4.1 model type in text_config, as the release does.
    nested = write_model(tmp_path / "c", "v41", "encoding.py", None)
    (nested / "config.json").write_text(json.dumps({"text_config": {"model_type": "deepseek_v41"}}))
    assert cf.load_encoding(nested).version == cf.V41
    # No file: V4 falls back to the built-in encoding, V4.1 cannot.
    v4_bare, v41_bare = tmp_path / "d", tmp_path / "e"
    for path, model_type in ((v4_bare, "deepseek_v4"), (v41_bare, "deepseek_v41")):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert cf.load_encoding(v4_bare) is None
    with pytest.raises(ChatFormatError, match=r"DeepSeek-V4.1 model .* no encoding/encoding.py"):
        cf.load_encoding(v41_bare)


def test_encoder_that_contradicts_the_model_type(tmp_path):
    with pytest.raises(ChatFormatError, match=r"model_type 'deepseek_v41' but encoding/encoding_dsv4.py is a V4 \(0731\)"):
        cf.load_encoding(write_model(tmp_path / "a", "v0731", "encoding_dsv4.py", "deepseek_v41"))
    with pytest.raises(ChatFormatError, match=r"model_type 'deepseek_v4' but encoding/encoding.py is a V4.1"):
        cf.load_encoding(write_model(tmp_path / "b", "v41", "encoding.py", "deepseek_v4"))


def test_unknown_or_incomplete_v41_encoder():
    src = encoder_source("v41")
    with pytest.raises(ChatFormatError, match="SYSTEM_SP_TOKEN"):
        cf.encoding_from_source(src.replace("SYSTEM_SP_TOKEN =", "OTHER ="), "encoding/encoding.py")
    with pytest.raises(ChatFormatError, match="integers 1-100"):
        cf.encoding_from_source(src.replace("'max': 100", "'max': 1000"))
    with pytest.raises(ChatFormatError, match="unknown encoder generation"):
        cf.encoding_from_source(src.replace("REASONING_EFFORT_MAPPINGS", "OTHER_MAPPINGS"))
