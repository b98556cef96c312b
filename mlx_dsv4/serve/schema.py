"""Request bodies: OpenAI's request shapes as pydantic models, and the 400s for bodies that do not fit.

Every field the server reads is declared with its type, so a malformed value is refused before
anything is queued, with `param` naming it as a JSON path (`messages[0].content[0].text`).
Unknown fields are allowed and ignored; `null` means "not given". Checked here too, where a
declaration cannot say it: strings that are not Unicode text, and token ids outside the vocabulary.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError, model_validator


class APIError(Exception):
    """An error answered in OpenAI's shape (B2)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        """`null` means "not given": OpenAI's schema makes optional fields nullable, and the
        openai SDK sends `null` for a parameter passed as None."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Part(Loose):
    type: str = "text"
    text: str | None = None
    refusal: str | None = None


class Called(Loose):
    name: str
    arguments: Any = None  # a JSON string; some clients send the object itself


class ToolCall(Loose):
    id: str | None = None
    function: Called


class Message(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None
    prefix: bool = False


class Named(Loose):
    name: str


class Function(Named):
    description: str | None = None
    parameters: dict | None = None


class Tool(Loose):
    type: str = "function"
    function: Function | None = None  # other types (web_search, ...) are ignored


class ToolRef(Loose):  # {"type": "function", "function": {"name": ...}} or {"name": ...}
    function: Named | None = None
    name: str | None = None


class AllowedTools(Loose):
    mode: Literal["auto", "none", "required"] = "auto"
    tools: list[ToolRef] = []


class ToolChoice(ToolRef):
    type: str = "function"
    allowed_tools: AllowedTools | None = None


class ResponseFormat(Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class StreamOptions(Loose):
    include_usage: bool = False


# Kept as the client's JSON (its key order is part of the prompt), checked against these shapes.
RENDERED = {"tools": TypeAdapter(list[Tool]), "functions": TypeAdapter(list[Function]),
            "response_format": TypeAdapter(ResponseFormat)}
MAX_STOPS = 32
# Logits are divided or multiplied by the repetition penalty: from 0.01 to 100 they stay finite
# (a penalty of 5e-324 made them infinite, and every logprob with them).
MIN_REPETITION_PENALTY = 0.01
NEEDS_CONTENT = ("system", "developer", "user", "tool")  # as OpenAI: only an assistant may omit it


class Sampling(Loose):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=100)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # keys: token ids
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        check_text(data)
        return data

    def sampling(self, vocab: int) -> dict:
        if self.n > 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per "
                           "request.", code="unsupported_parameter", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else self.seed % 2**64  # any int64, as OpenAI takes it
        bias = dict(self.logit_bias or {})
        check_ids(bias, vocab, "logit_bias")
        top_k = self.top_k if self.top_k and 0 < self.top_k < vocab else 0  # past the vocab: all
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": self.top_p or 0.0, "top_k": top_k, "min_p": self.min_p or 0.0,
                "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "seed": seed, "stop": stop,
                "logit_bias": bias}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["auto", "none", "required", "any"] | ToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    thinking: dict | None = None
    chat_template_kwargs: dict | None = None
    reasoning: dict | None = None
    functions: list[dict] | None = None
    function_call: Literal["auto", "none"] | Named | None = None

    @model_validator(mode="after")
    def _messages(self):
        check_messages(self.messages)
        return self

    @model_validator(mode="after")
    def _rendered_shapes(self):
        for name, shape in RENDERED.items():
            try:
                if getattr(self, name) is not None:
                    shape.validate_python(getattr(self, name))
            except ValidationError as e:
                raise invalid(e.errors(), name) from None
        return self


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt alone (echo), as OpenAI allowed
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


# ----- refusals ---------------------------------------------------------------------------------

_TYPES = {"string_type": "a string", "list_type": "a list", "int_type": "an integer",
          "float_type": "a number", "bool_type": "a boolean", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object"}
_GOT = {str: "a string", list: "a list", int: "an integer", float: "a number", bool: "a boolean",
        dict: "an object"}


def _path(loc, prefix: str = "") -> str:
    """pydantic's error location as a JSON path; the tags it adds for union members are dropped."""
    out = prefix
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not ("[" in p or p[:1].isupper() or p in ("str", "int", "float", "bool", "dict", "list")
                  or p.startswith(("function-", "constrained-"))):
            out += f".{p}" if out else p
    return out


def invalid(errors: list[dict], prefix: str = "") -> APIError:
    """The most specific of pydantic's errors as a 400: the deepest, and a wrong value before a
    wrong type; for a value of none of a union's types, all that was expected."""
    if not errors:
        return APIError(400, "The request body is not valid.")
    # The union member that got furthest (the highest list index) is the likeliest intent.
    ranked = [(len(_path(e["loc"])), e["type"] not in _TYPES,
               sum(p for p in e["loc"] if isinstance(p, int)), -i) for i, e in enumerate(errors)]
    best = max(ranked)
    first = errors[-best[3]]
    where = _path(first["loc"], prefix) or "body"
    message = first["msg"]
    if first["type"] in _TYPES:
        ties = [e for e, r in zip(errors, ranked) if r[:3] == best[:3]]
        expected = " or ".join(dict.fromkeys(_TYPES[e["type"]] for e in ties))
        message = f"expected {expected}, got {_GOT.get(type(first.get('input')), 'something else')}"
    return APIError(400, f"{where}: {message}", param=where)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(data: Any) -> None:
    """Refuse strings that are not Unicode text: a JSON `\\ud800` escape without its pair decodes
    to a lone surrogate, which has no UTF-8 encoding and so no tokens."""
    stack = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if hit := _SURROGATE.search(value):
                raise APIError(400, f"{where or 'body'}: the text holds a lone UTF-16 surrogate "
                               f"(\\u{ord(hit[0]):04x}), which is not a character; send complete "
                               "surrogate pairs or plain UTF-8.", param=where or None)
        elif isinstance(value, dict):
            keys = [k for k in value if isinstance(k, str) and _SURROGATE.search(k)]
            if keys:
                raise APIError(400, f"{where or 'body'}: a key holds a lone UTF-16 surrogate, which "
                               "is not a character.", param=where or None)
            items = [(v, f"{where}.{k}" if where else k) for k, v in value.items()]
            stack.extend(reversed(items))  # depth first in document order: the first bad one is named
        elif isinstance(value, list):
            items = [(v, f"{where}[{i}]") for i, v in enumerate(value) if isinstance(v, (str, dict, list))]
            stack.extend(reversed(items))


def check_messages(messages: list[Message]) -> None:
    """What OpenAI refuses of a message list the declarations let through: a message other than
    an assistant's without content (`null` reads as missing), a tool message without the id of
    the call it answers."""
    for i, m in enumerate(messages):
        if m.content is None and m.role in NEEDS_CONTENT:
            raise APIError(400, f"messages[{i}].content: a {m.role} message needs content (a string "
                           "or a list of content parts); it is missing or null.",
                           param=f"messages[{i}].content")
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(400, f"Missing required parameter: 'messages[{i}].tool_call_id' (the id of "
                           "the assistant's tool call this message answers).",
                           param=f"messages[{i}].tool_call_id")


def check_ids(ids, vocab: int, where: str) -> None:
    """Token ids must lie in [0, vocab): the embedding is read at each one, unchecked."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            at = f"{where}[{i}]" if isinstance(ids, list) else f"{where}.{t}"
            raise APIError(400, f"{at} is {t}, which is not a token id of this model: ids run from 0 to "
                           f"{vocab - 1}.", param=where.partition("[")[0])
