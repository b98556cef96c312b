"""The adapters between OpenAI's wire shapes and the engine (protocol.md Part B).

Requests (validated by `schema`): message normalisation (B4.2), thinking/effort resolution
(B4.3), tool choice (B4.4), the grammar constraint (`grammar`), token ids and context checked
-> an engine `Job`. Replies: `ChatReply` turns the engine's `Chunk`s into `Delta`s (reasoning,
content, tool calls, finish, usage); the SSE stream renders each delta and the non-streaming
reply is their fold. The Messages API (`anthropic`) reuses both halves; legacy completions
live in `completions`.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from ..text import chat_format
from ..generation.generate import Chunk, StopMatcher
from . import grammar
from .engine import Job, Progress
from .schema import APIError, ChatRequest, Part, ToolCall

log = logging.getLogger("mlx_dsv4.serve")

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra")
TEXT_PARTS = ("text", "input_text", "output_text", "refusal")
BAN = -1e9  # logit bias that forbids a token
LOGPROB_FLOOR = -9999.0  # the logprob OpenAI reports for a token of no probability
MAX_EFFORT_CONTEXT = 393_216  # Think Max wants >= 384K of context (A6); below it, "high" is used
# A token is ~4 bytes of text, up to ~12 as JSON \u escapes; 64 covers that and the structure.
BODY_BYTES_PER_TOKEN, BODY_FLOOR = 64, 4 << 20


@dataclass
class ServerConfig:
    model_id: str
    tokenizer: Any
    max_context: int
    encoding: Any = None
    api_key: str | None = None
    thinking: bool = True  # the default when a request says nothing (B4.3)
    created: int = field(default_factory=lambda: int(time.time()))
    ping: float = 15.0  # seconds between SSE keep-alive comments
    activity: float = 15.0  # seconds between activity events a stream sends while a prompt is read
    completion_max_tokens: int = 4096  # /v1/completions default budget (DeepSeek's FIM limit)
    exact_sampling: bool = False  # honour temperature/top_p/penalties in thinking mode too (B4.1)
    vocab_size: int | None = None  # the model's (its embedding's rows); default: the tokenizer's
    largest_context: int | None = None  # the largest context that fits this machine, if known

    @property
    def vocab(self) -> int:
        return self.vocab_size or self.tokenizer.vocab_size

    @property
    def max_body(self) -> int:
        """Bytes a request body may have: a full context of JSON-escaped text, with room to spare."""
        return max(BODY_FLOOR, BODY_BYTES_PER_TOKEN * self.max_context)

    def card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "local",
                "context_length": self.max_context, "max_model_len": self.max_context}


# ----- requests -> jobs -------------------------------------------------------------------------

def text_of(content: str | list[Part] | None, where: str) -> str:
    """A message's content as one string; text parts joined with a blank line (B4.2)."""
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS:
            raise APIError(400, f"{where}.content[{j}]: content parts of type {part.type!r} are not "
                           "supported; this model reads text only.", code="unsupported_content",
                           param=f"{where}.content[{j}].type")
    return "\n\n".join(part.text or part.refusal or "" for part in content)


def normalize(req: ChatRequest, tools: list[dict], system_turns: bool = False) -> list[dict]:
    """OpenAI messages -> the encoder's messages (B4.2 steps 1-8).

    A system message right after a user or tool message joins that user turn, and one that ends
    the conversation becomes a user turn: the V4 encoder renders system text bare and opens an
    assistant turn only after a user turn, so either would leave the model no turn to answer in.
    With `system_turns` (V4.1, whose encoder gives every system message a `<｜System｜>` turn
    that the assistant answers) system messages stay as they are.
    A last assistant message is continued (as with `prefix`) unless it holds tool calls."""
    out: list[dict] = []
    for i, m in enumerate(req.messages):
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        if role == "system" and out and out[-1]["role"] in ("user", "tool") and not system_turns:
            role = "user"
        msg = {"role": role, "content": text_of(m.content, f"messages[{i}]")}
        if role == "assistant":
            reasoning = m.reasoning_content or m.reasoning or m.thinking
            text = msg["content"]
            if not reasoning and text.lstrip().startswith("<think>") and "</think>" in text:
                reasoning, _, text = text.lstrip()[len("<think>"):].partition("</think>")
                msg["content"] = text.lstrip("\n")
            if reasoning:
                msg["reasoning_content"] = reasoning
            if m.tool_calls:
                msg["tool_calls"] = [_call(c) for c in m.tool_calls]
            if i == len(req.messages) - 1 and (m.prefix or not m.tool_calls):
                msg["wo_eos"] = True
        elif role == "tool" and m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if role == "system" and out and out[-1]["role"] == "system" and not system_turns:
            out[-1]["content"] += "\n\n" + msg["content"]
        else:
            out.append(msg)
    if out[-1]["role"] == "system" and not (system_turns and len(out) > 1):
        out[-1]["role"] = "user"
    if tools or req.response_format:
        if out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        if tools:
            out[0]["tools"] = tools
        if req.response_format and req.response_format.get("type") != "text":
            out[0]["response_format"] = req.response_format
    return out


def _call(c: ToolCall) -> dict:
    args = c.function.arguments
    if not isinstance(args, str):
        args = json.dumps(args if args is not None else {}, ensure_ascii=False)
    return {"id": c.id or "", "type": "function", "function": {"name": c.function.name, "arguments": args}}


def _requested_effort(req: ChatRequest) -> str | int | None:
    """The first effort given (B4.3): `reasoning_effort`, `reasoning.effort`, then the template's
    `reasoning_effort`, which may also be a number for V4.1's 1-100 scale (as its encoder takes)."""
    kw, r = req.chat_template_kwargs or {}, req.reasoning or {}
    for value, where in ((req.reasoning_effort, "reasoning_effort"), (r.get("effort"), "reasoning.effort"),
                         (kw.get("reasoning_effort"), "chat_template_kwargs.reasoning_effort")):
        if value is None or value == "":  # not given
            continue
        if isinstance(value, str) and value in EFFORTS:
            return value
        number = where.startswith("chat_template_kwargs")
        if number and type(value) is int and 1 <= value <= 100:
            return value
        raise APIError(400, f"{where} must be one of {', '.join(EFFORTS)}"
                       + (" or an integer from 1 to 100." if number else "."), param=where)
    return None


def resolve_thinking(req: ChatRequest, default: bool) -> tuple[bool, str | int | None]:
    """(thinking on?, effort) by B4.3's precedence."""
    kw, r = req.chat_template_kwargs or {}, req.reasoning or {}
    effort = _requested_effort(req)
    kind = (req.thinking or {}).get("type")
    on = None
    if kind in ("enabled", "disabled", "adaptive"):
        on = kind != "disabled"
    elif "thinking" in kw or "enable_thinking" in kw:
        on = bool(kw.get("thinking", kw.get("enable_thinking")))
    elif "enabled" in r:
        on = bool(r["enabled"])
    elif effort == "none":
        on = False
    elif req.model == "deepseek-chat" or req.model.endswith("-nothink"):
        on = False
    elif req.model == "deepseek-reasoner":
        on = True
    on = default if on is None else on
    return on, (effort if on and effort != "none" else None)


def effort_level(effort: str | int | None, cfg: ServerConfig) -> str | int:
    """API effort -> V4's low / high / max (A6; `max` needs a long context, else `high` is used),
    or V4.1's budget on its 1-100 scale (`chat_format.effort_on_scale`: the encoder's own levels,
    the other API names between them, numbers as given). The 384K rule is V4's Think Max recipe;
    V4.1 publishes none, so its budgets are not lowered."""
    encoding = cfg.encoding
    if getattr(encoding, "version", None) == chat_format.V41:
        try:
            return chat_format.effort_on_scale(encoding, effort)
        except chat_format.ChatFormatError as e:
            raise APIError(400, str(e), param="reasoning_effort") from e
    if isinstance(effort, int):
        raise APIError(400, "chat_template_kwargs.reasoning_effort: a number (1-100) is DeepSeek-V4.1's "
                       f"effort scale; this model takes one of {', '.join(EFFORTS)}.",
                       param="chat_template_kwargs.reasoning_effort")
    level = {"minimal": "low", "low": "low", "max": "max", "ultra": "max"}.get(effort or "high", "high")
    return "high" if level == "max" and cfg.max_context < MAX_EFFORT_CONTEXT else level


def encoder_effort(level: str | int, encoding) -> str | int | None:
    """The encoder's name for `level`: the preview encoder knows only unset (= high) and max;
    V4.1's takes its budget."""
    version = getattr(encoding, "version", None)
    return level if version in ("0731", chat_format.V41) or level == "max" else None


def _named(ref) -> str | None:
    """The tool a choice names: `{"function": {"name"}}`, or legacy and Responses-style `{"name"}`."""
    fn = getattr(ref, "function", None)
    return fn.name if fn else ref.name


def tool_setup(req: ChatRequest, encoding=None) -> tuple[list[dict], str | None, bool, str | None]:
    """(tools to render, forced text or None, tools forbidden?, the tool a choice names) from
    tools and tool_choice (B4.4); the forced text is in the DSML spelling of `encoding`."""
    tools = [t for t in req.tools or [] if t.get("type", "function") == "function" and "function" in t]
    tools += [{"type": "function", "function": f} for f in req.functions or []]
    choice = req.tool_choice if req.tool_choice is not None else req.function_call
    if allowed := getattr(choice, "allowed_tools", None):
        names = {_named(t) for t in allowed.tools}
        tools = [t for t in tools if t["function"]["name"] in names]
        choice = allowed.mode
    if choice in (None, "auto"):
        return tools, None, False, None
    if choice == "none":
        return tools, None, True, None
    name = choice if isinstance(choice, str) else _named(choice)
    if not tools:
        raise APIError(400, f"tool_choice asks for a tool call ({name!r}), but the request offers no "
                       "tools.", param="tool_choice")
    tags = grammar.tags_of(encoding)
    opener = tags.block_open + tags.invoke_prefix
    if choice in ("required", "any"):
        return tools, opener, False, None
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
    return tools, tags.block_open + tags.invoke_open(name), False, name


def context_error(prompt: int, cfg: ServerConfig, what: str = "messages") -> APIError:
    """OpenAI's wording, which agents match to compact their history (B2), then what would fit."""
    limit, largest = cfg.max_context, cfg.largest_context
    fits = ""
    if largest:
        fits = f" The largest context that fits this machine is {largest:,} tokens"
        fits += f"; start the server with --max-context {largest} to use it." if largest > limit else "."
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                    f"resulted in {prompt} tokens. Please reduce the length of the {what}.{fits}",
                    code="context_length_exceeded", param=what)


def budget(prompt: int, asked: int | None, cfg: ServerConfig, default: int | None = None,
           what: str = "messages") -> int:
    """Output budget: what was asked (or the default, or all that is left), clamped to the context."""
    room = cfg.max_context - prompt
    if room < 1:
        raise context_error(prompt, cfg, what)
    return min(asked or default or room, room)


def token_ids(tok, *tokens: str) -> list[int]:
    return [i for i in map(tok.token_to_id, tokens) if i is not None]


@dataclass
class ForcedCall(Job):
    """tool_choice required / named (B4.4): generate until reasoning ends (at once without
    thinking), append the DSML opener and continue through the same backend, which reuses its
    cache. The caller sees one stream, as if the model had written the opener itself."""

    force: str = ""
    thinking: bool = False
    think_end: int | None = None  # the `</think>` token
    encode: Callable[[str], list[int]] | None = None
    constraint: Any = None  # a `constrain.Constraint` for the block, from its opener on

    def run(self, backend, **extra) -> Iterator[Chunk]:
        sampling = dict(self.sampling, **extra)
        ids, forced, first, done = list(self.ids), self.force, None, 0
        if self.thinking:
            stops = [*sampling.get("stop_token_ids", ()), self.think_end]
            dsml, tokens = Seen(chat_format.DSML), []
            for chunk in backend.generate(ids, **dict(sampling, stop_token_ids=stops)):
                first = first or chunk
                tokens += [chunk.token] if chunk.token is not None else []
                if dsml.feed(chunk.text) or chunk.finish_reason != "stop":
                    yield chunk  # a length cut, or the model called a tool on its own
                    if chunk.finish_reason:
                        return
                    continue
                done = chunk.generation_tokens
                if chunk.token == self.think_end:
                    ids += tokens
                else:  # it ended inside reasoning: close the reasoning for it
                    ids, forced = ids + tokens[:-1], chat_format.THINK_CLOSE + forced
                chunk.text += chat_format.THINK_CLOSE + self.force
                chunk.finish_reason = chunk.stop = None
                yield chunk
                break
            else:
                return
        else:
            yield Chunk(text=forced, prompt_tokens=len(ids))
        ids += self.encode(forced)
        if self.constraint is not None:
            self.constraint.prime(self.encode(self.force))
            sampling["logits_processors"] = [*sampling.get("logits_processors", ()), self.constraint]
        remaining = sampling["max_tokens"] - done
        if backend.max_context:
            remaining = min(remaining, backend.max_context - len(ids))
        for chunk in backend.generate(ids, **dict(sampling, max_tokens=max(remaining, 0))):
            chunk.generation_tokens += done
            chunk.prompt_tokens = len(self.ids)
            chunk.reused_tokens = first.reused_tokens if first else min(chunk.reused_tokens, len(self.ids))
            yield chunk


@dataclass
class ChatJob:
    job: Job
    thinking: bool  # the reply starts inside reasoning
    tools: bool
    stop: list[str]
    parallel: bool
    logprobs: int | None  # top-n, or None when not asked
    exclude_reasoning: bool
    effort: str | None


@dataclass
class Prompt:
    ids: list[int]
    messages: list[dict]  # as rendered
    tools: list[dict]
    force: str | None  # the forced tool-call opener
    forbid: bool  # tool_choice none
    named: str | None  # the tool tool_choice names
    thinking: bool
    level: str | int | None  # the effort level (V4.1: its budget), when thinking


def render_prompt(req: ChatRequest, cfg: ServerConfig) -> Prompt:
    """The request's prompt as token ids, and what decided it."""
    tools, force, forbid, named = tool_setup(req, cfg.encoding)
    messages = normalize(req, tools, system_turns=getattr(cfg.encoding, "version", None) == chat_format.V41)
    thinking, effort = resolve_thinking(req, cfg.thinking)
    level = effort_level(effort, cfg) if thinking else None
    try:
        segments = chat_format.render_segments(
            messages, thinking=thinking, encoding=cfg.encoding,
            reasoning_effort=None if level is None else encoder_effort(level, cfg.encoding))
    except chat_format.ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from e
    ids = cfg.tokenizer.encode_segments(segments)
    return Prompt(ids, messages, tools, force, forbid, named, thinking, level)


def chat_job(req: ChatRequest, cfg: ServerConfig) -> ChatJob:
    tok = cfg.tokenizer
    p = render_prompt(req, cfg)
    ids, messages, tools, force, forbid, thinking = p.ids, p.messages, p.tools, p.force, p.forbid, p.thinking
    sampling = req.sampling(cfg.vocab)
    if thinking and not cfg.exact_sampling:
        deepseek_compat(sampling)
    stop = sampling.pop("stop")
    n = req.top_logprobs or 0
    sampling.update(max_tokens=budget(len(ids), req.max_completion_tokens or req.max_tokens, cfg),
                    logprobs=max(n, 1) if req.logprobs else 0,
                    stop_token_ids=token_ids(tok, chat_format.USER, chat_format.ASSISTANT))
    if forbid:
        sampling["logit_bias"].update(dict.fromkeys(token_ids(tok, chat_format.DSML), BAN))
    prefix = messages[-1].get("wo_eos", False)
    # A continued assistant message holds text the grammar never saw: it is left unconstrained.
    constraint = None if prefix else grammar.reply_constraint(
        tok, cfg.vocab, tools, forced=force, name=p.named, parallel=req.parallel_tool_calls,
        forbid=forbid, response_format=req.response_format, thinking=thinking,
        tags=grammar.tags_of(cfg.encoding))
    if force is None:
        job = Job(ids, sampling)
        if constraint is not None:
            sampling["logits_processors"] = [constraint]
    else:
        job = ForcedCall(ids, sampling, force=force, thinking=thinking and not prefix,
                         think_end=tok.token_to_id(chat_format.THINK_CLOSE),
                         encode=lambda text: tok.encode(text, allow_control=True), constraint=constraint)
    job.report_progress = True  # `chat_deltas` turns it into `Delta.progress`
    return ChatJob(job, thinking and not prefix, bool(tools), stop, req.parallel_tool_calls,
                   n if req.logprobs else None, bool((req.reasoning or {}).get("exclude")),
                   None if p.level is None else str(p.level))


def deepseek_compat(sampling: dict) -> None:
    """Thinking-mode sampling as DeepSeek's API does it (B4.1): temperature and the presence and
    frequency penalties are ignored, top_p is at least 0.95. Agents that send temperature 0
    would otherwise reason greedily, which loops."""
    sampling.update(temperature=1.0, presence_penalty=None, frequency_penalty=None)
    if sampling.get("top_p"):
        sampling["top_p"] = max(sampling["top_p"], 0.95)


# ----- chunks -> deltas -------------------------------------------------------------------------

@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop: str | None = None  # the stop string that ended the reply
    usage: dict | None = None
    progress: Progress | None = None  # prefill progress: the reply has not begun


def usage(chunk: Chunk | None, prompt: int, reasoning: int | None = None) -> dict:
    prompt = chunk.prompt_tokens if chunk else prompt
    done, cached = (chunk.generation_tokens, chunk.reused_tokens) if chunk else (0, 0)
    out = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
           "prompt_tokens_details": {"cached_tokens": cached},
           "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


class ChatReply:
    """Parse the chunk stream into deltas: reasoning, content (stop strings apply here only),
    tool calls with ids; count reasoning tokens; keep logprobs of content tokens."""

    def __init__(self, cj: ChatJob, tokenizer):
        self.cj, self.tok = cj, tokenizer
        self.parser = chat_format.ReplyParser(thinking=cj.thinking, tools_enabled=cj.tools)
        self.stops = StopMatcher(cj.stop)
        self.think_closed, self.dsml = Seen(chat_format.THINK_CLOSE), Seen(chat_format.DSML)
        self.calls, self.reasoning_tokens = 0, 0
        self.open: dict[int, str] = {}  # arguments given so far of calls begun and not ended
        self.lps: list[dict] = []
        self.ender = ending(cj.job, tokenizer)
        self.finish_reason: str | None = None
        self.stop_hit: str | None = None
        self.done = False  # we ended the reply (stop string, single tool call)
        self.last: Chunk | None = None
        self.first_progress: Progress | None = None

    def progress(self, p: Progress) -> Delta:
        self.first_progress = self.first_progress or p
        return Delta(progress=p)

    def prompt_usage(self) -> tuple[int, int]:
        """(prompt tokens, of which reused from a cache) as known so far: from a generated
        token's chunk, else from the first prefill progress (what the backend did not read
        itself was reused), else nothing reused."""
        prompt = len(self.cj.job.ids)
        if self.last is not None and self.last.token is not None:
            return self.last.prompt_tokens, self.last.reused_tokens
        if (p := self.first_progress) is not None:
            return prompt, max(0, min(prompt, prompt - p.total))
        return prompt, 0

    def feed(self, chunk: Chunk) -> list[Delta]:
        self.last = chunk
        closed_before = self.think_closed.hit
        closed, dsml = self.think_closed.feed(chunk.text), self.dsml.feed(chunk.text)
        if self.cj.thinking and not closed:
            self.reasoning_tokens += 1
        content = not (self.cj.thinking and not closed_before) and not dsml
        if self.cj.logprobs is not None and chunk.logprob is not None and content and not self.ender(chunk):
            self.lps.append(self._logprob(chunk))
        events = self.parser.feed(chunk.text)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            events += self.parser.finish()
        return self._deltas(events)

    def finish(self) -> list[Delta]:
        out = [] if self.done or self.finish_reason else self._deltas(self.parser.finish())
        if not self.done and (rest := self.stops.flush()):
            out.append(Delta(content=rest))
        reason = "length" if self.finish_reason == "length" else "tool_calls" if self.calls else "stop"
        out.append(Delta(finish_reason=reason, stop=self.stop_hit, logprobs=self._take()))
        prompt = len(self.cj.job.ids)
        out.append(Delta(usage=usage(self.last, prompt, self.reasoning_tokens)))
        return out

    def _deltas(self, events) -> list[Delta]:
        out = []
        for e in events:
            if self.done:
                break
            if isinstance(e, chat_format.ReasoningDelta):
                if e.text and not self.cj.exclude_reasoning:
                    out.append(Delta(reasoning=e.text))
            elif isinstance(e, chat_format.ContentDelta):
                text, hit = self.stops.feed(e.text)
                if text:
                    out.append(Delta(content=text, logprobs=self._take()))
                if hit is not None:
                    self.done, self.finish_reason, self.stop_hit = True, "stop", hit
            elif isinstance(e, chat_format.ToolCallStart):
                if rest := self.stops.flush():
                    out.append(Delta(content=rest))
                self.open[e.index] = ""
                out.append(Delta(tool_calls=[{"index": e.index, "id": e.id, "type": "function",
                                              "function": {"name": e.name, "arguments": ""}}]))
            elif isinstance(e, chat_format.ToolCallArgs):
                self.open[e.index] += e.text
                out.append(Delta(tool_calls=[{"index": e.index, "function": {"arguments": e.text}}]))
            elif isinstance(e, chat_format.ToolCallEvent):
                del self.open[e.index]
                self.calls += 1
                if e.problems:
                    log.warning("tool call %s read leniently: %s", e.name, "; ".join(e.problems))
                self.done = not self.cj.parallel
            elif isinstance(e, chat_format.ToolCallError):
                if e.index is not None and self.finish_reason != "length":
                    # The model stopped inside a call it had begun: what it wrote is the call.
                    self.calls += 1
                    closing = chat_format.close_arguments(self.open.pop(e.index))
                    out.append(Delta(tool_calls=[{"index": e.index, "function": {"arguments": closing}}]))
                    log.warning("tool call %s closed where the reply ended", e.name)
                elif e.index is not None:  # cut by the token limit: reported as cut (finish "length")
                    log.warning("tool call %s cut by the token limit", e.name)
                else:
                    log.warning("dropped DSML: %s", e.reason)
        return out

    def _take(self) -> list[dict]:
        out, self.lps = self.lps, []
        return out

    def _logprob(self, chunk: Chunk) -> dict:
        def item(t, lp):
            text, raw = token_text(self.tok, t)
            return {"token": text, "logprob": reported(lp), "bytes": list(raw)}

        top = [item(t, lp) for t, lp in chunk.top_logprobs[: self.cj.logprobs]]
        return {**item(chunk.token, chunk.logprob), "top_logprobs": top}


class Seen:
    """Whether `marker` has appeared in the text fed so far, across chunk boundaries, keeping
    only a marker-sized tail: the reply is never re-joined or re-scanned per token."""

    def __init__(self, marker: str):
        self.marker, self.tail, self.hit = marker, "", False

    def feed(self, text: str) -> bool:
        if not self.hit:
            window = self.tail + text
            self.hit = self.marker in window
            self.tail = window[-(len(self.marker) - 1):]
        return self.hit


def ending(job: Job, tok) -> Callable[[Chunk], bool]:
    """Whether a chunk is the token that ended the reply (EOS, a stop token): not reply text, so
    it gets no logprobs entry; every other generated token gets one."""
    enders = set(tok.eos_token_ids) | set(job.sampling.get("stop_token_ids", ()))
    return lambda chunk: chunk.finish_reason == "stop" and chunk.token in enders


def reported(logprob: float) -> float:
    """A logprob as JSON can carry it: a token the grammar or a bias rules out has -inf (or a
    NaN), which JSON cannot hold; such tokens are reported at OpenAI's floor, `LOGPROB_FLOOR`."""
    return min(logprob, 0.0) if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def token_text(tok, token: int) -> tuple[str, bytes]:
    """A token as logprobs show it: its text, or for a piece of a UTF-8 character its bytes
    written as OpenAI does (`bytes:\\xe6\\x97`); and its exact bytes."""
    text = tok.decode([token])
    raw = token_bytes(tok, token, text)
    if "\ufffd" in text and raw != text.encode():
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, raw


def token_bytes(tok, token: int, text: str) -> bytes:
    """The token's exact bytes (a byte-level piece may be part of a UTF-8 character)."""
    piece = tok.id_to_token(token) if hasattr(tok, "id_to_token") else None
    if piece is None or text == piece:
        return text.encode()
    table = _unicode_to_byte()
    return bytes(table[c] for c in piece) if all(c in table for c in piece) else text.encode()


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to 256 + n.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)], n = b, n + 1
    return chars


async def chat_deltas(chunks: AsyncIterator[Chunk | Progress], reply: ChatReply) -> AsyncIterator[Delta]:
    try:
        async for chunk in chunks:
            if isinstance(chunk, Progress):
                yield reply.progress(chunk)
                continue
            for d in reply.feed(chunk):
                yield d
            if reply.done:
                break
    finally:
        await chunks.aclose()
    for d in reply.finish():
        yield d


# ----- deltas -> wire ---------------------------------------------------------------------------

def envelope(kind: str, model: str) -> dict:
    prefix = "chatcmpl-" if kind.startswith("chat") else "cmpl-"
    return {"id": prefix + secrets.token_hex(12), "object": kind, "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_mlx_dsv4"}


async def chat_chunks(deltas: AsyncIterator[Delta], env: dict, include_usage: bool):
    """The `chat.completion.chunk` objects of a streamed reply (B6)."""
    def chunk(delta: dict, finish=None, logprobs=None) -> dict:
        lp = {"content": logprobs, "refusal": None} if logprobs else None
        out = dict(env, choices=[{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}])
        return dict(out, usage=None) if include_usage else out

    yield chunk({"role": "assistant", "content": ""})
    async for d in deltas:
        if d.usage is not None:
            if include_usage:
                yield dict(env, choices=[], usage=d.usage)
            continue
        delta = {k: v for k, v in (("reasoning_content", d.reasoning), ("content", d.content),
                                   ("tool_calls", d.tool_calls)) if v}
        if delta or d.finish_reason or d.logprobs:
            yield chunk(delta, d.finish_reason, d.logprobs)


async def fold_chat(deltas: AsyncIterator[Delta], env: dict, want_logprobs: bool) -> dict:
    """The non-streaming `chat.completion`: the fold of the same deltas (B5)."""
    reasoning, content, calls, lps, finish, use = [], [], {}, [], None, None
    async for d in deltas:
        reasoning.append(d.reasoning)
        content.append(d.content)
        lps += d.logprobs
        finish, use = d.finish_reason or finish, d.usage or use
        for tc in d.tool_calls:
            call = calls.setdefault(tc["index"], {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            call["id"] = tc.get("id", call["id"])
            call["function"]["name"] += tc["function"].get("name", "")
            call["function"]["arguments"] += tc["function"].get("arguments", "")
    message = {"role": "assistant", "content": "".join(content) or None}
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    lp = {"content": lps, "refusal": None} if want_logprobs else None
    choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
    return dict(env, object="chat.completion", choices=[choice], usage=use)
