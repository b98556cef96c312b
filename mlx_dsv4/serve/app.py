"""The FastAPI app: routes, errors in OpenAI's shape (Anthropic's under `/messages`), the checks
every request passes first (`guard`: Host, Origin, key, JSON), CORS for allowed pages, SSE
(protocol.md B1-B8).

Handlers parse, call one function of `protocol` (or `anthropic`, `responses`), render. Every route also answers without the
`/v1` prefix, with a trailing slash or doubled slashes, and ignores the query string. A body
larger than the context could need is refused before it is parsed; a stream cut by the server's
shutdown ends with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..generation.prefill import ContextError
from . import anthropic, completions, protocol, responses, responses_events
from .engine import Busy, Engine, Job, Refused, Stopped
from .guard import LOOPBACK, Hosts, check_host, check_json, check_key, check_origin
from .page import chat_page
from .protocol import ServerConfig
from .schema import APIError, ChatRequest, CompletionRequest, invalid

log = logging.getLogger("mlx_dsv4.serve")
OPEN = ("/", "/health", "/healthz")  # answered without an API key (the page asks for it)
SHUTDOWN_GRACE = 2.0  # seconds a stream has to send its last event when the server stops


def create_app(engine: Engine, config: ServerConfig, *, cors_origins: Sequence[str] = (),
               hosts: Hosts = LOOPBACK) -> FastAPI:
    """The app; `cors_origins`: the web pages (`https://host:port`) that may use it, answered with
    CORS headers (none by default: no page may); `hosts`: the Host names it answers to."""
    origins = frozenset(cors_origins)
    app = FastAPI(title="mlx-dsv4", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Edge, max_body=config.max_body, api_key=config.api_key, hosts=hosts,
                       origins=origins)
    if origins:  # outside _Edge: a preflight carries no key, and refusals carry the headers too
        app.add_middleware(CORSMiddleware, allow_origins=sorted(origins),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                           allow_private_network=False)
    _errors(app)
    store = responses.Store()

    @app.get("/", include_in_schema=False)
    async def page():
        body, headers = chat_page()
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/health")
    @app.get("/healthz")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, 503)
        return JSONResponse({"status": "ok" if engine.ready else "loading"}, 200 if engine.ready else 503)

    @app.api_route("/", methods=["HEAD"])
    async def root():  # clients (Claude Code) probe the base URL before their first request
        return Response(status_code=200)

    @app.get("/models")
    async def models():
        return {"object": "list", "data": [config.card()]}

    @app.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_id:
            raise APIError(404, f"The model {model_id!r} does not exist.", code="model_not_found",
                           param="model")
        return config.card()

    @app.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        cj = await run_in_threadpool(protocol.chat_job, req, config)
        reply = protocol.ChatReply(cj, config.tokenizer)
        deltas = protocol.chat_deltas(_submit(engine, cj.job), reply)
        env = protocol.envelope("chat.completion.chunk", config.model_id)
        headers = {"x-reasoning-effort": cj.effort} if cj.effort else {}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(protocol.chat_chunks(deltas, env, usage), cj.job, config, headers)
        return await _json(request, protocol.fold_chat(deltas, env, req.logprobs), headers)

    @app.post("/completions")
    async def completion(req: CompletionRequest, request: Request):
        job = await run_in_threadpool(completions.completion_job, req, config)
        reply = completions.CompletionReply(job, req, config.tokenizer)
        env = protocol.envelope("text_completion", config.model_id)
        chunks = _submit(engine, job)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(reply.chunks(chunks, env, usage), job, config)
        return await _json(request, reply.fold(chunks, env))

    @app.post("/messages")
    async def messages(req: anthropic.MessagesRequest, request: Request):
        cj = await run_in_threadpool(anthropic.chat_job, req, config)
        reply = protocol.ChatReply(cj, config.tokenizer)
        deltas = protocol.chat_deltas(_submit(engine, cj.job), reply)
        msg = anthropic.message(config.model_id)  # the served id, as /v1/chat answers
        if req.stream:
            return _sse(anthropic.events(deltas, msg, reply, config.activity), cj.job, config, named=True)
        return await _json(request, anthropic.fold(deltas, msg, reply))

    @app.post("/messages/count_tokens")
    async def count_tokens(req: anthropic.CountRequest):
        p = await run_in_threadpool(lambda: protocol.render_prompt(anthropic.chat_request(req), config))
        return {"input_tokens": len(p.ids)}

    @app.post("/responses")
    async def create_response(req: responses.ResponsesRequest, request: Request):
        turn = await run_in_threadpool(responses.prepare, req, config, store)
        reply = protocol.ChatReply(turn.cj, config.tokenizer)
        deltas = protocol.chat_deltas(_submit(engine, turn.cj.job), reply)
        if req.stream:
            events = responses_events.events(deltas, turn, store, config.ping, describe=_client_error)
            return _sse(events, turn.cj.job, config, named=True)
        return await _json(request, responses_events.fold(deltas, turn, store))

    @app.get("/responses/{response_id}")
    async def get_response(response_id: str):
        return store.get(response_id)

    @app.delete("/responses/{response_id}")
    async def delete_response(response_id: str):
        return store.delete(response_id)

    return app


def _submit(engine: Engine, job):
    try:
        return engine.submit(job)
    except Busy as e:
        raise APIError(429, str(e), type="rate_limit_error", headers={"Retry-After": "5"}) from e


def _client_error(e: Exception) -> APIError | None:
    """What the client is told of an error from the engine or the reply's adapters; None for a
    failure of the server's own (answered as a 500)."""
    if isinstance(e, Refused):
        code = "context_length_exceeded" if isinstance(e.error, ContextError) else None
        return APIError(400, str(e), code=code)
    if isinstance(e, Stopped):
        return APIError(503, str(e), type="server_error")
    return e if isinstance(e, APIError) else None


async def _json(request: Request, fold, headers: dict | None = None) -> Response:
    """The non-streaming reply; if the client leaves first, its generation is cancelled."""
    task = asyncio.ensure_future(fold)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                return Response(status_code=499)  # nginx's "client closed request"
        if (e := task.exception()) is not None:
            raise _client_error(e) or e
        return JSONResponse(task.result(), headers=headers)
    finally:
        task.cancel()


def _sse(objects, job: Job, config: ServerConfig, headers: dict | None = None,
         named: bool = False) -> EventSourceResponse:
    """OpenAI's stream (data lines, then `[DONE]`) or, when `named`, Anthropic's: `(event, data)`
    items as named events, an error as an `error` event."""
    shutdown = anyio.Event()  # set by sse-starlette when uvicorn is told to exit

    async def interrupt():
        await shutdown.wait()
        job.emit(Stopped("The server is shutting down; this reply was cut short."))

    async def events():
        watch = asyncio.ensure_future(interrupt())
        try:
            async for obj in objects:
                if named:
                    yield ServerSentEvent(_dumps(obj[1]), event=obj[0])
                else:
                    yield _dumps(obj)
        except Exception as e:  # headers are sent: the error goes in the stream (B2)
            if (error := _client_error(e)) is None:
                log.exception("stream failed")
                error = APIError(500, str(e) or type(e).__name__, type="server_error")
            if named:
                yield ServerSentEvent(_dumps(anthropic.error_body(error)), event="error")
            else:
                yield json.dumps(error.body())
        else:
            if not named:
                yield "[DONE]"
        finally:
            watch.cancel()

    return EventSourceResponse(events(), ping=config.ping, sep="\n",
                               headers={"Cache-Control": "no-cache", **(headers or {})},
                               shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error(e: APIError, path: str = "") -> JSONResponse:
    """The error in the shape of the API the path belongs to."""
    body = anthropic.error_body(e) if path.startswith("/messages") else e.body()
    return JSONResponse(body, e.status, headers=e.headers)


def _errors(app: FastAPI):
    @app.exception_handler(APIError)
    async def api(request, e: APIError):
        return _error(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def malformed(request, e: RequestValidationError):
        errors = e.errors()
        if errors and errors[0]["type"] == "json_invalid":
            why = errors[0].get("ctx", {}).get("error", "")
            return _error(APIError(400, f"The request body is not valid JSON: {why} at character "
                                   f"{errors[0]['loc'][-1]}."), request.url.path)
        return _error(invalid([dict(err, loc=err["loc"][1:]) for err in errors]), request.url.path)

    @app.exception_handler(HTTPException)
    async def http(request, e: HTTPException):
        path, route = request.scope.get("original_path", request.url.path), request.url.path
        if e.status_code == 404:
            return _error(APIError(404, f"Invalid URL ({request.method} {path})"), route)
        if e.status_code == 405:
            return _error(APIError(405, f"{request.method} is not allowed on {path}; allowed: "
                                   f"{e.headers.get('Allow', 'none')}.", headers=e.headers), route)
        if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not decode the body
            why = "it is nested too deeply" if isinstance(e.__cause__, RecursionError) else e.__cause__
            return _error(APIError(400, f"The request body is not valid JSON: {why}."), route)
        return _error(APIError(e.status_code, str(e.detail)), route)


class _Edge:
    """What every request passes before a route sees it, in this order: route on a normalised
    path (no `/v1` prefix, single slashes, no trailing slash); refuse a Host that is not this
    server's, an Origin the user did not allow, a missing or repeated API key and a body not
    declared JSON (`guard`: all on the headers, before a byte of the body is received); read the
    body, refusing one over `max_body` bytes before parsing it; answer an unexpected failure with
    a 500 in the error shape. (A Starlette handler for `Exception` re-raises after answering, and
    uvicorn then drops the kept-alive connection.)"""

    def __init__(self, app, max_body: int, api_key: str | None, hosts: Hosts, origins: frozenset[str]):
        self.app, self.max_body, self.api_key = app, max_body, api_key
        self.hosts, self.origins = hosts, origins

    def _refusal(self, scope, path: str) -> APIError | None:
        headers = scope["headers"]
        error = check_host(headers, self.hosts) or check_origin(headers, self.origins)
        if error is None and path not in OPEN:
            error = check_key(headers, self.api_key)
        if error is None and scope["method"] == "POST":
            error = check_json(headers)
        if error is not None and error.status == 403:  # the browser hides it from the page: say it here
            log.warning("refused %s %s: %s", scope["method"], scope["path"], error.message)
        return error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = re.sub("/+", "/", scope["path"]).rstrip("/") or "/"
        if path == "/v1" or path.startswith("/v1/"):
            path = path[3:] or "/"
        if (error := self._refusal(scope, path)) is not None:  # uvicorn discards the unread body
            return await _error(error, path)(scope, receive, send)
        headers = scope["headers"]
        if scope["method"] == "POST":
            headers = [h for h in headers if h[0] != b"content-type"]  # none or JSON: read as JSON (B1)
            headers.append((b"content-type", b"application/json"))
            body = await _read_body(receive, self.max_body, dict(headers).get(b"content-length"))
            if body is None:
                error = APIError(413, f"The request body is larger than the {self.max_body:,} bytes "
                                 "this server accepts (an amount sized to its context).",
                                 headers={"Connection": "close"})
                return await _error(error, path)(scope, receive, send)
            receive = _replay(body, receive)
        scope = dict(scope, path=path, raw_path=path.encode(), original_path=scope["path"], headers=headers)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            if started:
                raise
            log.error("request failed", exc_info=e)
            error = APIError(500, str(e) or type(e).__name__, type="server_error",
                             headers={"x-should-retry": "false"})
            await _error(error, path)(scope, receive, send)


async def _read_body(receive, limit: int, declared: bytes | None) -> bytes | None:
    """The whole body, or None when it is over `limit` bytes: at once if its Content-Length says
    so; else, once past the limit, nothing more is kept and what the client still sends is read
    and dropped for up to a second, so that it gets to read the 413 before the connection closes."""
    if declared is not None and int(declared) > limit:
        return None
    parts, size, more, deadline = [], 0, True, None
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app finds out when it next listens
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
            continue
        parts, deadline = [], deadline or time.monotonic() + 1.0
        if time.monotonic() > deadline:
            break
    return b"".join(parts) if size <= limit else None


def _replay(body: bytes, receive):
    """`receive` for an app that reads a body already read: the body once, then the live channel
    (where the app hears of a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
