"""Grammars for constrained replies: DSML tool-call blocks whose parameters satisfy each tool's
JSON schema (protocol A7), and JSON for `response_format`.

A tool block is written as Lark for llguidance: the block and invoke tags as literals (in the
encoder generation's spelling, `Tags`: V4 `<｜DSML｜tool_calls>`, V4.1 `<｜DSML｜ calls>`), only the
offered tool names, each tool's declared parameters in declared order (required ones present),
plain strings as raw `string="true"` text and every other value as `string="false"` JSON compiled
from its schema (`%json`). Schemas llguidance cannot compile are refused with a 400 that names
the feature and where it is. `constrain.Constraint` applies the grammar; this module only writes it.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Callable

from ..text import chat_format
from ..generation import constrain
from .schema import APIError

log = logging.getLogger("mlx_dsv4.serve")
D = chat_format.DSML


@dataclass(frozen=True)
class Tags:
    """The names written after the DSML token: V4's by default, V4.1's (" calls", " invoke",
    " parameter") from its encoder."""

    block: str = "tool_calls"
    invoke: str = "invoke"
    param: str = "parameter"

    @property
    def block_open(self) -> str:
        return f"\n\n<{D}{self.block}>\n"

    @property
    def block_close(self) -> str:
        return f"\n</{D}{self.block}>"

    @property
    def param_close(self) -> str:
        return f"</{D}{self.param}>"

    @property
    def invoke_prefix(self) -> str:  # what a forced call writes before the tool's name
        return f'<{D}{self.invoke} name="'

    def invoke_open(self, name: str) -> str:
        return f'{self.invoke_prefix}{name}">\n'


def tags_of(encoding) -> Tags:
    """The DSML spelling of a checkpoint's encoder (None: V4's)."""
    enc = encoding or chat_format.BUILTIN
    return Tags(enc.block_name, enc.invoke_tag, enc.param_tag)


V4 = Tags()
BLOCK_OPEN, BLOCK_CLOSE, PARAM_CLOSE = V4.block_open, V4.block_close, V4.param_close
# Keys that do not constrain a plain string: such a value is written raw, as the encoder does.
_ANNOTATIONS = {"type", "description", "title", "default", "examples", "enum", "const"}
# Values are written as the encoder writes them in prompts: `json.dumps` with its separators.
VALUE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "if", "$ref")


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    # Escape every non-alphanumeric ASCII character: llguidance's regex gives `&` and `~` meaning too.
    return "".join(f"\\x{ord(c):02x}" if c.isascii() and not c.isalnum() else c for c in text)


class _Writer:
    def __init__(self):
        self.rules: list[str] = []

    def rule(self, name: str, body: str) -> str:
        self.rules.append(f"{name}: {body}")
        return name


def _raw_string(schema: dict) -> bool:
    if schema.get("type") != "string" or set(schema) - _ANNOTATIONS:
        return False
    values = schema.get("enum", []) + ([schema["const"]] if "const" in schema else [])
    return all(isinstance(v, str) for v in values)


def _param(w: _Writer, rule: str, key: str, schema: dict, defs: dict, where: str, tok, tags: Tags) -> str:
    """A rule for one `<parameter>` line holding a value valid for `schema`."""
    end = tags.param_close

    def opener(kind: str) -> str:
        return _lit(f'<{D}{tags.param} name="{key}" string="{kind}">')

    if _raw_string(schema):
        values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
        if values is not None:
            alts = " | ".join(_lit(v) for v in values) or '""'
            return w.rule(rule, f'{opener("true")} ({alts}) {_lit(end)}')
        # Lazy: the value ends at the first close tag, so it can never hold one.
        value = w.rule(f"{rule}_v[lazy]", f"/(.|\\n)*{_regex_escape(end)}/")
        return w.rule(rule, f'{opener("true")} {value.split("[")[0]}')
    full = dict(schema, **({"$defs": defs} if defs and "$defs" not in schema else {}))
    full["x-guidance"] = VALUE_JSON
    try:
        constrain.check(constrain.json_schema(full), tok)
    except constrain.GrammarError as e:
        raise APIError(400, f"{where}: this schema cannot be enforced: {e}", code="unsupported_schema",
                       param=where) from None
    value = w.rule(f"{rule}_j", f"%json {json.dumps(full, ensure_ascii=False)}")
    return w.rule(rule, f'{opener("false")} {value} {_lit(end)}')


def _arguments(w: _Writer, rule: str, params: dict | None, where: str, tok, tags: Tags) -> str:
    """The parameter lines of one invoke, each followed by a newline (none: one newline)."""
    end = tags.param_close
    params = params or {"type": "object"}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise APIError(400, f"{where}: a tool's parameters must be a JSON schema of type object.",
                       code="unsupported_schema", param=where)
    if used := [k for k in _COMBINATORS if k in params]:
        raise APIError(400, f"{where}: {', '.join(used)} at the top of a tool's parameters cannot be "
                       "enforced; describe the arguments with properties.", code="unsupported_schema",
                       param=where)
    defs = params.get("$defs") or params.get("definitions") or {}
    props, required = params.get("properties") or {}, set(params.get("required") or [])
    if missing := sorted(required - set(props)):
        raise APIError(400, f"{where}: required names {', '.join(missing)}, which properties does not "
                       "declare.", code="unsupported_schema", param=where)
    if not props:  # no declared keys: any names, any values
        key = w.rule(f"{rule}_k", r'/[A-Za-z0-9_.\-]+/')
        free = w.rule(f"{rule}_s[lazy]", f"/(.|\\n)*{_regex_escape(end)}/").split("[")[0]
        anyjson = w.rule(f"{rule}_a", f"%json {json.dumps({'x-guidance': VALUE_JSON})}")
        line = w.rule(f"{rule}_p", f'"<{D}{tags.param} name=\\"" {key} "\\" string=" '
                      f'("\\"true\\">" {free} | "\\"false\\">" {anyjson} {_lit(end)}) "\\n"')
        return w.rule(rule, f'"\\n" | {line}+')
    items = []
    for j, (key, sub) in enumerate(props.items()):
        if '"' in key or not isinstance(sub, dict):
            raise APIError(400, f"{where}.properties.{key}: cannot be written as a DSML parameter.",
                           code="unsupported_schema", param=where)
        line = _param(w, f"{rule}_{j}", key, sub, defs, f"{where}.properties.{key}", tok, tags)
        items.append(f'({line} "\\n")' + ("" if key in required else "?"))
    body = " ".join(items)
    return w.rule(rule, body if required else f'"\\n" | {body}')


def tool_block(tools: list[dict], tok, *, name: str | None = None, parallel: bool = True,
               start: str | None = None, tags: Tags = V4) -> str:
    """Lark for a whole tool-call block from `start` (the opener, or what is left of it once
    the model has begun it) to its close tag: calls only to `tools` (only `name`, if given),
    one call unless `parallel`."""
    start = tags.block_open if start is None else start
    return _tool_block(json.dumps(tools, ensure_ascii=False), tok, name, parallel, start, tags)


@functools.lru_cache(maxsize=32)
def _tool_block(tools_json: str, tok, name: str | None, parallel: bool, start: str, tags: Tags) -> str:
    # Cached on the tools' JSON: an agent sends the same tools with every request.
    tools = json.loads(tools_json)
    w = _Writer()
    first, more = [], []
    for i, t in enumerate(tools):
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        args = _arguments(w, f"args{i}", fn.get("parameters"), f"tools[{i}].function.parameters", tok, tags)
        opener, close = tags.invoke_open(fn["name"]), _lit(f"</{D}{tags.invoke}>")
        first.append(w.rule(f"invoke{i}", f"{_lit(opener)} {args} {close}"))
        # The newline between calls opens the next call: llguidance's lexer lets no token run
        # from a lone "\n" into the next tag while "\n</...>" could also follow.
        more.append(w.rule(f"more{i}", f"{_lit(chr(10) + opener)} {args} {close}"))
    calls = f'({" | ".join(first)})' + (f' ({" | ".join(more)})*' if parallel else "")
    grammar = "\n".join([f"start: {_lit(start)} {calls} {_lit(tags.block_close)}", *w.rules])
    return constrain.lark(grammar)


def json_reply(response_format: dict, tok) -> str | None:
    """The grammar for a `response_format`, or None for plain text."""
    kind = response_format.get("type")
    if kind == "json_object":
        return constrain.json_schema({"type": "object"})
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON object.",
                       param="response_format.json_schema.schema")
    try:
        grammar = constrain.json_schema(schema)
        constrain.check(grammar, tok)
    except constrain.GrammarError as e:
        raise APIError(400, f"response_format.json_schema.schema: this schema cannot be enforced: {e}",
                       code="unsupported_schema", param="response_format.json_schema.schema") from None
    return grammar


class AfterReasoning:
    """A gate that opens at `</think>` (at once without thinking) and then, if `opener` is
    given, once the model has written `<｜DSML｜`: the token, right after text ending in `<`."""

    def __init__(self, think_end: int | None, dsml: int | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        self.think_end, self.dsml, self.decode = think_end, dsml, decode
        self.prev: int | None = None

    def __call__(self, token: int) -> bool:
        prev, self.prev = self.prev, token
        if self.think_end is not None:
            if token == self.think_end:
                self.think_end = None
                return self.dsml is None
            return False
        if self.dsml is None:
            return True
        return token == self.dsml and prev is not None and self.decode([prev]).endswith("<")


def reply_constraint(tok, vocab: int, tools: list[dict], *, forced: str | None, name: str | None,
                     parallel: bool, forbid: bool, response_format: dict | None, thinking: bool,
                     tags: Tags = V4):
    """The `Constraint` for one chat reply, or None: a forced tool call (the grammar from the
    block opener; the caller primes it with the opener it writes), an `auto` tool block (from
    the model's own `<｜DSML｜`), or JSON; each after the reasoning when thinking."""
    try:
        return _constraint(tok, vocab, tools, forced, name, parallel, forbid, response_format, thinking, tags)
    except ImportError as e:  # llguidance missing: replies are parsed as sampled
        log.warning("tool calls and JSON are not constrained: %s", e)
        return None
    except constrain.GrammarError as e:
        raise APIError(400, f"The tools or response_format cannot be enforced: {e}",
                       code="unsupported_schema") from None


def _constraint(tok, vocab, tools, forced, name, parallel, forbid, response_format, thinking, tags):
    ll = constrain.grammar_tokenizer(tok, vocab)
    think_end = tok.token_to_id(chat_format.THINK_CLOSE) if thinking else None
    if tools and forced is not None:
        return constrain.Constraint(ll, tool_block(tools, ll, name=name, parallel=parallel, tags=tags))
    if tools and not forbid:
        rest = tags.block_open.split(D, 1)[1]  # what follows the model's `<｜DSML｜`
        gate = AfterReasoning(think_end, tok.token_to_id(D), tok.decode)
        try:
            return constrain.Constraint(ll, tool_block(tools, ll, parallel=parallel, start=rest, tags=tags),
                                        gate=gate)
        except (APIError, constrain.GrammarError) as e:
            # The model may not call a tool at all: an agent's odd schema must not cost it the
            # request, so its calls are parsed unconstrained instead.
            log.info("tool calls left unconstrained: %s", e)
            return None
    if response_format and (g := json_reply(response_format, ll)) is not None:
        return constrain.Constraint(ll, g, gate=AfterReasoning(think_end) if thinking else None)
    return None
