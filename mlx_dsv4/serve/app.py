"""The FastAPI app: routes, errors in OpenAI's shape, CORS, auth, SSE (protocol.md B1-B8).

Handlers parse, call one function of `protocol`, render. Every route also answers without the
`/v1` prefix, with a trailing slash or doubled slashes, and ignores the query string.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import protocol
from .engine import Busy, Engine
from .protocol import APIError, ChatRequest, CompletionRequest, ServerConfig

log = logging.getLogger("mlx_dsv4.serve")
OPEN = ("/health", "/healthz")  # answered without an API key


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    async def check_key(request: Request):
        if config.api_key and request.url.path not in OPEN:
            h = request.headers
            scheme, _, bearer = h.get("authorization", "").strip().partition(" ")
            bearer = bearer.strip() if scheme.lower() == "bearer" else ""  # schemes ignore case
            if config.api_key not in (h.get("x-api-key"), h.get("api-key"), bearer):
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    app = FastAPI(title="mlx-dsv4", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check_key)])
    app.add_middleware(_Edge)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], allow_private_network=True)
    _errors(app)

    @app.get("/health")
    @app.get("/healthz")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, 503)
        return JSONResponse({"status": "ok" if engine.ready else "loading"}, 200 if engine.ready else 503)

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
        env = protocol.envelope("chat.completion.chunk", req.model or config.model_id)
        headers = {"x-reasoning-effort": cj.effort} if cj.effort else {}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(protocol.chat_chunks(deltas, env, usage), config, headers)
        return await _json(request, protocol.fold_chat(deltas, env, req.logprobs), headers)

    @app.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = await run_in_threadpool(protocol.completion_job, req, config)
        reply = protocol.CompletionReply(job, req, config.tokenizer)
        env = protocol.envelope("text_completion", req.model or config.model_id)
        chunks = _submit(engine, job)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(reply.chunks(chunks, env, usage), config)
        return await _json(request, reply.fold(chunks, env))

    return app


def _submit(engine: Engine, job):
    try:
        return engine.submit(job)
    except Busy as e:
        raise APIError(429, str(e), type="rate_limit_error", headers={"Retry-After": "5"}) from e


async def _json(request: Request, fold, headers: dict | None = None) -> Response:
    """The non-streaming reply; if the client leaves first, its generation is cancelled."""
    task = asyncio.ensure_future(fold)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                return Response(status_code=499)  # nginx's "client closed request"
        return JSONResponse(task.result(), headers=headers)
    finally:
        task.cancel()


def _sse(objects, config: ServerConfig, headers: dict | None = None) -> EventSourceResponse:
    async def events():
        try:
            async for obj in objects:
                yield json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        except APIError as e:
            yield json.dumps(e.body())
        except Exception as e:  # headers are sent: the error goes in the stream (B2)
            log.exception("stream failed")
            yield json.dumps(APIError(500, str(e) or type(e).__name__, type="server_error").body())
        else:
            yield "[DONE]"

    return EventSourceResponse(events(), ping=config.ping, sep="\n",
                               headers={"Cache-Control": "no-cache", **(headers or {})})


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def _errors(app: FastAPI):
    @app.exception_handler(APIError)
    async def api(request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _error(APIError(400, f"{where}: {first.get('msg', 'invalid request body')}", param=where))

    @app.exception_handler(HTTPException)
    async def http(request, e: HTTPException):
        if e.status_code == 404:
            path = request.scope.get("original_path", request.url.path)
            return _error(APIError(404, f"Invalid URL ({request.method} {path})"))
        return _error(APIError(e.status_code, str(e.detail)))


class _Edge:
    """Route on a normalised path (no `/v1` prefix, single slashes, no trailing slash), read
    every POST body as JSON whatever its Content-Type says (B1), and answer an unexpected
    failure with a 500 in the error shape. (A Starlette handler for `Exception` re-raises
    after answering, and uvicorn then drops the kept-alive connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = re.sub("/+", "/", scope["path"]).rstrip("/") or "/"
        if path == "/v1" or path.startswith("/v1/"):
            path = path[3:] or "/"
        headers = scope["headers"]
        if scope["method"] == "POST" and b"json" not in dict(headers).get(b"content-type", b""):
            headers = [h for h in headers if h[0] != b"content-type"]
            headers.append((b"content-type", b"application/json"))
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
            await _error(error)(scope, receive, send)
