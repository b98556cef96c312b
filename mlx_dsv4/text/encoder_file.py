"""Reading a checkpoint's chat encoder file (protocol A6-A8): its generation and fixed texts.

DeepSeek ships the prompt format as Python beside the weights: `encoding/encoding_dsv4.py` for
V4 (preview and 0731 generations), `encoding/encoding.py` for V4.1. `encoding_from_source` reads
its constants with `ast` and never runs the file; the effort constants tell the generation.
`load_encoding` finds the file in a model directory and checks it against config.json's
model_type. `BUILTIN` holds V4's token strings and templates for a checkpoint without the file.
`effort_budget` and `effort_on_scale` turn an effort name or number into a V4.1 budget.
Rendering is `chat_format`'s.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .chat_parser import ASSISTANT, DSML, EOS, THINK_CLOSE, THINK_OPEN, USER

BOS = "<｜begin▁of▁sentence｜>"
ENCODER_FILE = "encoding/encoding_dsv4.py"
ENCODER_FILE_V41 = "encoding/encoding.py"  # V4.1 ships its encoder under this name
V41 = "v41"


class ChatFormatError(ValueError):
    """Messages or options the encoder cannot render; the message says what to change."""


@dataclass(frozen=True)
class Encoding:
    """The fixed texts of one encoder generation. `efforts` maps each accepted
    `reasoning_effort` to the paragraph put after BOS in thinking mode (V4), or to its budget on
    V4.1's 1-100 scale; the key None is the default."""

    version: str  # "preview", "0731", "v41" or "builtin"
    bos: str
    eos: str
    think_open: str
    think_close: str
    dsml: str
    user: str
    assistant: str
    latest_reminder: str
    tasks: Mapping[str, str]
    system_tpl: str
    user_tpl: str
    reminder_tpl: str
    assistant_tpl: str
    assistant_wo_eos_tpl: str
    thinking_tpl: str
    tool_call_tpl: str
    tool_calls_tpl: str
    block_name: str
    param_tpl: str
    tool_output_tpl: str
    tools_tpl: str | None
    response_format_tpl: str | None
    efforts: Mapping[str | None, str | int]
    constants: Mapping[str, Any] = field(default_factory=dict)  # as read from the encoder file
    # V4.1 only: the token that opens system turns, the effort line, the DSML tag names.
    system: str | None = None
    effort_tpl: str | None = None
    invoke_tag: str = "invoke"
    param_tag: str = "parameter"


# Encoding field <- module-level name in the encoder file (V41_NAMES: V4.1's own).
ENCODER_NAMES = {
    "bos": "bos_token", "eos": "eos_token", "think_open": "thinking_start_token",
    "think_close": "thinking_end_token", "dsml": "dsml_token", "user": "USER_SP_TOKEN",
    "assistant": "ASSISTANT_SP_TOKEN", "latest_reminder": "LATEST_REMINDER_SP_TOKEN",
    "tasks": "DS_TASK_SP_TOKENS", "system_tpl": "system_msg_template", "user_tpl": "user_msg_template",
    "reminder_tpl": "latest_reminder_msg_template", "assistant_tpl": "assistant_msg_template",
    "assistant_wo_eos_tpl": "assistant_msg_wo_eos_template", "thinking_tpl": "thinking_template",
    "tool_call_tpl": "tool_call_template", "tool_calls_tpl": "tool_calls_template",
    "block_name": "tool_calls_block_name", "tool_output_tpl": "tool_output_template",
}
_OPTIONAL = {"tools_tpl": "TOOLS_TEMPLATE", "response_format_tpl": "response_format_template"}
V41_NAMES = {"system": "SYSTEM_SP_TOKEN", "effort_tpl": "REASONING_EFFORT_TEMPLATE",
              "invoke_tag": "tool_call_tag_name", "param_tag": "tool_parameter_tag_name"}
_PARAM_TPL = ("encode_arguments_to_dsml", "p_dsml_template")

# Protocol facts (A2, A4, A7, A8): enough to chat, and to replay tool calls, without the file.
BUILTIN = Encoding(
    version="builtin", bos=BOS, eos=EOS, think_open=THINK_OPEN, think_close=THINK_CLOSE, dsml=DSML,
    user=USER, assistant=ASSISTANT, latest_reminder="<｜latest_reminder｜>",
    tasks={t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")},
    system_tpl="{content}", user_tpl="{content}", reminder_tpl="{content}",
    assistant_tpl="{reasoning}{content}{tool_calls}" + EOS,
    assistant_wo_eos_tpl="{reasoning}{content}{tool_calls}",
    thinking_tpl="{reasoning_content}",
    tool_call_tpl='<{dsml_token}invoke name="{name}">\n{arguments}\n</{dsml_token}invoke>',
    tool_calls_tpl="<{dsml_token}{tc_block_name}>\n{tool_calls}\n</{dsml_token}{tc_block_name}>",
    block_name="tool_calls",
    param_tpl='<{dsml_token}parameter name="{key}" string="{is_str}">{value}</{dsml_token}parameter>',
    tool_output_tpl="<tool_result>{content}</tool_result>",
    tools_tpl=None, response_format_tpl=None, efforts={None: ""},
)


# ----- reading the file ------------------------------------------------------------------------

class _NotConstant(Exception):
    pass


def _evaluate(node: ast.AST, known: Mapping[str, Any]) -> Any:
    """Value of a constant expression: literals, known names, `+`, f-strings, dicts, lists."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in known:
        return known[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, known) + _evaluate(node.right, known)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue) and v.conversion == -1 and v.format_spec is None:
                parts.append(str(_evaluate(v.value, known)))
            else:
                parts.append(_evaluate(v, known))
        return "".join(parts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_evaluate(k, known): _evaluate(v, known) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, known) for e in node.elts]
    raise _NotConstant


def _assignments(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            yield node.target.id, node.value


def _constants(body: list[ast.stmt], known: Mapping[str, Any]) -> dict[str, Any]:
    """String and dict constants assigned in `body`, in source order."""
    found: dict[str, Any] = {}
    for name, value in _assignments(body):
        try:
            v = _evaluate(value, {**known, **found})
        except (_NotConstant, TypeError):
            v = None  # a later non-constant assignment hides the earlier value
        if isinstance(v, (str, dict)):
            found[name] = v
        else:
            found.pop(name, None)
    return found


def encoding_from_source(src: str, name: str = ENCODER_FILE) -> Encoding:
    """Parse the text of an encoder file (never executed) into an `Encoding`; `name` is the file's
    name in messages. The generation is told by the effort constants it defines."""
    tree = ast.parse(src)
    consts = _constants(tree.body, {})
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == _PARAM_TPL[0]), None)
    param_tpl = _constants(list(ast.walk(fn)), consts).get(_PARAM_TPL[1]) if fn else None
    missing = [n for f, n in ENCODER_NAMES.items() if not isinstance(consts.get(n), dict if f == "tasks" else str)]
    if missing:
        raise ChatFormatError(f"{name} does not define {', '.join(missing)} as expected; "
                              "this encoder generation is not supported")
    fields = {f: consts[n] for f, n in ENCODER_NAMES.items()}
    fields.update({f: consts.get(n) for f, n in _OPTIONAL.items()})
    prompts, default = consts.get("REASONING_EFFORT_PROMPTS"), consts.get("DEFAULT_REASONING_EFFORT")
    scale = consts.get("REASONING_EFFORT_MAPPINGS")
    if "REASONING_EFFORT_TEMPLATE" in consts and isinstance(scale, dict):
        version, efforts = V41, _budgets(scale, default, name)
        missing = [n for n in V41_NAMES.values() if not isinstance(consts.get(n), str)]
        if missing:
            raise ChatFormatError(f"{name} is a V4.1 encoder without {', '.join(missing)}; "
                                  "this encoder generation is not supported")
        fields.update({f: consts[n] for f, n in V41_NAMES.items()})
    elif isinstance(prompts, dict) and default in prompts:
        version, efforts = "0731", {None: prompts[default], **prompts}
    elif "REASONING_EFFORT_MAX" in consts:
        version, efforts = "preview", {None: "", "high": "", "max": consts["REASONING_EFFORT_MAX"]}
    else:
        raise ChatFormatError(f"{name} has neither REASONING_EFFORT_MAX, REASONING_EFFORT_PROMPTS nor "
                              "REASONING_EFFORT_MAPPINGS: unknown encoder generation")
    # The DSML parameter line is part of the grammar (A7); keep the built-in one if not found.
    return Encoding(version=version, param_tpl=param_tpl or BUILTIN.param_tpl, efforts=efforts,
                    constants=consts, **fields)


def _budgets(scale: dict, default: Any, name: str) -> dict:
    """V4.1's named efforts -> budgets, checked: integers on the 1-100 scale, a known default."""
    bad = [k for k, v in scale.items() if not isinstance(k, str) or type(v) is not int or not 1 <= v <= 100]
    if bad or default not in scale:
        raise ChatFormatError(f"{name}: REASONING_EFFORT_MAPPINGS must map names to integers 1-100 and "
                              "DEFAULT_REASONING_EFFORT must be one of them")
    return {None: scale[default], **scale}


def _model_type(model_dir: Path) -> str | None:
    """config.json's model_type (top level, or a nested text_config's), None if unreadable."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    return config.get("model_type") or (text.get("model_type") if isinstance(text, dict) else None)


def load_encoding(model_dir: str | Path) -> Encoding | None:
    """The checkpoint's encoding, or None when a V4 checkpoint ships no encoder file.

    V4 ships `encoding/encoding_dsv4.py`, V4.1 `encoding/encoding.py`; the file's constants tell the
    generation, and config.json's model_type must agree with it. A V4.1 model without its file
    is refused: its prompts (effort line, `<｜System｜>` turns) cannot be written without it."""
    model_dir = Path(model_dir)
    model_type = _model_type(model_dir)
    v41 = model_type == "deepseek_v41"
    names = (ENCODER_FILE_V41, ENCODER_FILE) if v41 else (ENCODER_FILE, ENCODER_FILE_V41)
    path = next((model_dir / n for n in names if (model_dir / n).is_file()), None)
    if path is None:
        if v41:
            raise ChatFormatError(f"{model_dir} holds a DeepSeek-V4.1 model (config.json model_type "
                                  f"'deepseek_v41') but no {ENCODER_FILE_V41}: the V4.1 prompt format "
                                  "comes from that file; copy it from the original checkpoint")
        return None
    name = path.relative_to(model_dir).as_posix()
    enc = encoding_from_source(path.read_text(encoding="utf-8"), name)
    if model_type in ("deepseek_v4", "deepseek_v41") and v41 != (enc.version == V41):
        raise ChatFormatError(f"{model_dir}: config.json says model_type {model_type!r} but {name} is a "
                              f"{'V4.1' if enc.version == V41 else 'V4 (' + enc.version + ')'} encoder; "
                              "copy the encoding folder of this model's own checkpoint")
    return enc


# ----- efforts on V4.1's 1-100 scale ------------------------------------------------------------

def effort_budget(enc: Encoding, effort: str | int | None) -> int:
    """V4.1's budget for `reasoning_effort` as its encoder accepts it: None (the default), one of
    the names it defines, or an integer 1-100 (not a bool, not a float)."""
    if (effort is None or isinstance(effort, str)) and effort in enc.efforts:
        return int(enc.efforts[effort])
    if type(effort) is int and 1 <= effort <= 100:
        return effort
    names = ", ".join(k for k in enc.efforts if k is not None)
    raise ChatFormatError(f"reasoning_effort={effort!r} is not accepted by this checkpoint's V4.1 encoder; "
                          f"use an integer from 1 to 100 or one of {names}")


def effort_on_scale(enc: Encoding, effort: str | int | None) -> int:
    """`effort_budget`, and also the API names V4.1's encoder does not define (OpenAI's minimal,
    medium, xhigh; ultra). The encoder's named levels are evenly spaced (low 50, high 75, max
    100) and its README says budgets between them give interpolated reasoning, so medium and
    xhigh sit halfway between their neighbours (rounded up: 63, 88), minimal one spacing below
    the lowest level (25) and ultra at the top of the scale (100)."""
    if not isinstance(effort, str) or effort in enc.efforts:
        return effort_budget(enc, effort)
    named = {k: int(v) for k, v in enc.efforts.items() if k is not None}
    if {"low", "high", "max"} <= set(named):
        low, high, top = named["low"], named["high"], named["max"]
        derived = {"minimal": max(1, low - (high - low)), "medium": (low + high + 1) // 2,
                   "xhigh": (high + top + 1) // 2, "ultra": top}
        if effort in derived:
            return derived[effort]
    return effort_budget(enc, effort)  # says what is accepted


def reference_encoder_source(version: str = "0731") -> str:
    """An encoder file holding DeepSeek's texts for `version` ("0731": V4-Flash-0731's
    `encoding_dsv4.py`, tools block and effort paragraphs; "v41": V4.1's `encoding.py`, System
    token and 1-100 effort line), written from the constants packaged beside this module the way
    the reference file assigns them, so that `load_encoding` reads it as it reads a release's.
    Model folders made here (the selftest's) get a complete encoder with it."""
    data = json.loads((Path(__file__).parent / f"encoding_{version}.json").read_text(encoding="utf-8"))
    consts, eos = data["constants"], data["constants"]["eos_token"]
    lines = [f'"""{data["_source"]}"""', ""]
    for name, value in consts.items():
        if name == "assistant_msg_template" and value.endswith(eos):  # the reference writes "..." + eos_token
            lines.append(f"{name} = {value[: -len(eos)]!r} + eos_token")
        else:
            lines.append(f"{name} = {value!r}")
    template = data.get("function_constants", {}).get(".".join(_PARAM_TPL))
    if template is not None:
        lines += ["", f"def {_PARAM_TPL[0]}(tool_call):", f"    {_PARAM_TPL[1]} = {template!r}",
                  f"    return {_PARAM_TPL[1]}.format(**tool_call)", ""]
    return "\n".join(lines)
