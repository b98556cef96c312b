"""The reply of a Responses request: protocol's `Delta`s -> output items and the stream's events.

Each reasoning run, message and tool call becomes an output item, built by the events the API
defines for it (`output_item.added`, its content part, deltas, `.done`), numbered by
`sequence_number`; the stream opens with `response.created` and `.in_progress` and ends with
`response.completed`, `.incomplete` (the output budget ran out) or `.failed`. The non-streaming
reply is the response the same events end with. A finished reply is kept in the `Store` with the
conversation it continues, for `previous_response_id`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import AsyncIterator, Callable

from .protocol import Delta
from .responses import CUSTOM_PARAM, Item, Store, Turn, history, seal
from .schema import APIError

log = logging.getLogger("mlx_dsv4.serve")


def usage(u: dict | None) -> dict:
    """Chat usage in this API's terms; the tokens read anew are kept in the decode state for the
    next turn, so they count as written to the cache."""
    u = u or {}
    prompt, cached = u.get("prompt_tokens", 0), u.get("prompt_cache_hit_tokens", 0)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": prompt - cached},
            "output_tokens": u.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": u.get("completion_tokens_details", {}).get(
                "reasoning_tokens", 0)},
            "total_tokens": u.get("total_tokens", 0)}


class _Writer:
    """The output items of one reply and the events that build them, numbered in order."""

    def __init__(self, turn: Turn):
        self.turn, self.seq = turn, 0
        self.output: list[dict] = turn.response["output"]
        self.item: dict | None = None  # the item being written
        self.buf: list[str] = []
        self.calls: dict[int, dict] = {}  # a tool-call delta's index -> its item
        self.sealed = "reasoning.encrypted_content" in (turn.req.include or [])

    def event(self, kind: str, **body) -> tuple[str, dict]:
        self.seq += 1
        return kind, {"type": kind, "sequence_number": self.seq - 1, **body}

    def snapshot(self, kind: str) -> tuple[str, dict]:
        """The response as it stands; the item being written shows its text so far."""
        output = [self._partial() if item is self.item else item for item in self.output]
        return self.event(kind, response=dict(self.turn.response, output=output))

    def _partial(self) -> dict:
        item, text = dict(self.item), "".join(self.buf)
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
        elif item["type"] == "message":
            item["content"] = [{"type": "output_text", "text": text, "annotations": []}]
        elif item["type"] == "function_call":
            item["arguments"] = text
        return item

    def _at(self, **more) -> dict:
        """Where the item being written is: its id and output index (and a content index)."""
        return {"item_id": self.item["id"], "output_index": len(self.output) - 1, **more}

    def open(self, item: dict, part: dict | None = None) -> list:
        out = self.close()
        item["status"] = "in_progress"
        self.item, self.buf = item, []
        self.output.append(item)
        out.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                              item=dict(item)))
        if part is not None:
            out.append(self.event("response.content_part.added", **self._at(content_index=0), part=part))
        return out

    def write(self, kind: str, text: str) -> list:
        """Text of the reasoning or the message: a new item when the kind changes."""
        out = []
        if self.item is None or self.item["type"] != kind:
            if kind == "reasoning":
                out = self.open({"id": "rs_" + secrets.token_hex(16), "type": "reasoning", "summary": [],
                                 "content": []},
                                {"type": "reasoning_text", "text": ""})
            else:
                out = self.open({"id": "msg_" + secrets.token_hex(16), "type": "message", "role": "assistant",
                                 "content": []},
                                {"type": "output_text", "text": "", "annotations": []})
        self.buf.append(text)
        if kind == "reasoning":
            return out + [self.event("response.reasoning_text.delta", **self._at(content_index=0),
                                     delta=text)]
        return out + [self.event("response.output_text.delta", **self._at(content_index=0), delta=text,
                                 logprobs=[])]

    def call(self, tc: dict) -> list:
        """One tool-call fragment: the head opens a call item; the rest are its arguments."""
        out, fn = [], tc.get("function") or {}
        if "id" in tc or tc["index"] not in self.calls:
            namespace, name, kind = self.turn.tools.names.get(fn.get("name") or "",
                                                              (None, fn.get("name") or "", "function"))
            call_id = tc.get("id") or "call_" + secrets.token_hex(12)
            if kind == "custom":
                item = {"id": "ctc_" + secrets.token_hex(16), "type": "custom_tool_call", "call_id": call_id,
                        "name": name, "input": ""}
            else:
                item = {"id": "fc_" + secrets.token_hex(16), "type": "function_call", "call_id": call_id,
                        "name": name, "arguments": ""}
            if namespace:
                item["namespace"] = namespace
            self.calls[tc["index"]] = item
            out = self.open(item)
        if args := fn.get("arguments"):
            if self.item is not self.calls[tc["index"]]:
                raise RuntimeError("a tool call's arguments arrived after a later output item")
            self.buf.append(args)
            if self.item["type"] == "function_call":  # a custom call's input is known once it is whole
                out.append(self.event("response.function_call_arguments.delta", **self._at(), delta=args))
        return out

    def close(self, status: str = "completed") -> list:
        """Finish the item being written: its `.done` events, then `output_item.done`."""
        item, text = self.item, "".join(self.buf)
        if item is None:
            return []
        out, at = [], self._at()
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item["content"] = [part]
            if self.sealed:
                item["encrypted_content"] = seal(text)
            out += [self.event("response.reasoning_text.done", **at, content_index=0, text=text),
                    self.event("response.content_part.done", **at, content_index=0, part=part)]
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"] = [part]
            out += [self.event("response.output_text.done", **at, content_index=0, text=text, logprobs=[]),
                    self.event("response.content_part.done", **at, content_index=0, part=part)]
        elif item["type"] == "function_call":
            item["arguments"] = text
            out.append(self.event("response.function_call_arguments.done", **at, arguments=text))
        else:
            item["input"] = custom_input(text)
            out += [self.event("response.custom_tool_call_input.delta", **at, delta=item["input"]),
                    self.event("response.custom_tool_call_input.done", **at, input=item["input"])]
        item["status"], self.item = status, None
        return out + [self.event("response.output_item.done", output_index=at["output_index"], item=item)]


def custom_input(arguments: str) -> str:
    """A custom tool's raw input from the arguments of the function it was offered as."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value.get(CUSTOM_PARAM, "") if isinstance(value, dict) else arguments


async def _paced(deltas: AsyncIterator[Delta], every: float | None) -> AsyncIterator[Delta | None]:
    """The deltas, and None whenever `every` seconds pass without one (a prompt being read)."""
    it, pending = deltas.__aiter__(), None
    try:
        while True:
            pending = pending or asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await it.aclose()


async def events(deltas: AsyncIterator[Delta], turn: Turn, store: Store, every: float | None = 15.0,
                 describe: Callable[[Exception], APIError | None] | None = None
                 ) -> AsyncIterator[tuple[str, dict]]:
    """(event name, data) of a streamed reply: response.created and .in_progress (again whenever
    `every` seconds pass without output, so that a client's idle timer sees a long prompt being
    read), each item's added / delta / done events, then response.completed, or .incomplete when
    the output budget ran out. With `describe`, an error becomes response.failed; without, it is
    raised (the non-streaming reply)."""
    w, resp = _Writer(turn), turn.response
    yield w.snapshot("response.created")
    yield w.snapshot("response.in_progress")
    finish, use = None, None
    try:
        async for d in (_paced(deltas, every) if every else deltas):
            if d is None:
                yield w.snapshot("response.in_progress")
                continue
            out = []
            if d.reasoning:
                out += w.write("reasoning", d.reasoning)
            if d.content:
                out += w.write("message", d.content)
            for tc in d.tool_calls:
                out += w.call(tc)
            finish, use = d.finish_reason or finish, d.usage or use
            for item in out:
                yield item
    except Exception as e:
        if describe is None:
            raise
        if (error := describe(e)) is None:
            log.exception("stream failed")
            error = APIError(500, str(e) or type(e).__name__, type="server_error", code="server_error")
        for item in w.close("incomplete"):
            yield item
        resp.update(status="failed", error={"code": error.code or error.type, "message": error.message})
        yield w.snapshot("response.failed")
        return
    cut = finish == "length"
    for item in w.close("incomplete" if cut else "completed"):
        yield item
    resp.update(status="incomplete" if cut else "completed", usage=usage(use),
                incomplete_details={"reason": "max_output_tokens"} if cut else None)
    if turn.req.store:
        store.put(resp, turn.history + reply_messages(resp["output"]))
    yield w.snapshot("response.incomplete" if cut else "response.completed")


async def fold(deltas: AsyncIterator[Delta], turn: Turn, store: Store) -> dict:
    """The non-streaming reply: the response the same events end with."""
    last = None
    async for _, data in events(deltas, turn, store, every=None):
        last = data
    return last["response"]


def reply_messages(output: list[dict]) -> list[dict]:
    """A reply's output items as the chat messages that continue its conversation (an empty
    reply still takes its turn)."""
    return history([Item(**i) for i in output]) or [{"role": "assistant", "content": ""}]
