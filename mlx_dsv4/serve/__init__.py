"""`dsv4 serve`: OpenAI- and Anthropic-compatible HTTP endpoints for a converted model.

`engine` owns the model on one thread, `protocol` translates OpenAI requests and replies,
`anthropic` the Messages API (into the same requests), `grammar` writes the grammars that
constrain tool calls and JSON, `app` holds the routes, `page` the chat page served at `/`.
FastAPI, uvicorn and sse-starlette are imported only in this package.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Sequence

log = logging.getLogger("mlx_dsv4.serve")


def create_server(model_path: str | Path, *, api_key: str | None = None,
                  max_context: int | None = None, model_id: str | None = None,
                  kv_bits: int | None = None, prefill_chunk: int = 512, thinking: bool = True,
                  exact_sampling: bool = False, wire_memory: bool = True,
                  draft: int | None = None, expert_memory: int | str | None = None,
                  prompt_cache: dict | None = None, max_batch: int | None = None,
                  host: str = "127.0.0.1", cors_origins: Sequence[str] = (),
                  allow_hosts: Sequence[str] = ()):
    """Plan memory and build `(engine, app, config)` for a converted model; the engine is not
    started (it loads the model on its own thread when it is). `draft`: MTP draft tokens per
    step (None: the default when the checkpoint has an MTP block; 0: no speculation).
    `expert_memory` (bytes, or "auto") streams the routed experts from disk through a cache.
    `prompt_cache`: `prompt_cache.open_prompt_cache`'s options (`max_bytes`, `directory`,
    `disk_bytes`) for the states kept across requests and restarts (None: the live cache only).
    `max_batch`: requests decoding together (None: as many as the planner fits, up to 8); above
    1 the engine batches them (`generation.batch`), without speculative decoding.

    `host`: the address the server will listen on, for the Host check (`guard.hosts_for`, widened
    by `allow_hosts`); `cors_origins`: the web pages allowed to use the server (none by default).

    `max_context` defaults to the largest context that fits this machine, capped by the model's
    maximum; a given value that does not fit is refused with the planner's verdict.
    """
    from ..text.chat_format import load_encoding
    from ..config import ModelArgs
    from ..generation.constrain import grammar_tokenizer
    from ..plan import apply_wired_limit, default_batch, plan_context
    from ..generation.cache_folder import claim_option
    from ..generation.prompt_cache import DEFAULT_BYTES
    from ..generation.session import Session
    from ..text.tokenizer import Tokenizer
    from ..model.weights import load_model
    from .app import create_app
    from .engine import Engine
    from .guard import hosts_for, normal_origin
    from .protocol import ServerConfig

    path = Path(model_path).expanduser()
    claim_option(prompt_cache)  # a folder that is not the cache's own is refused before loading
    kept = prompt_cache.get("max_bytes", DEFAULT_BYTES) if prompt_cache else 0
    options = dict(kv_bits=kv_bits, prefill_chunk=prefill_chunk, expert_memory=expert_memory,
                   other_bytes=kept)
    plan, max_context = plan_context(path, max_context, batch=max_batch or 1, **options)
    if max_batch is None:
        max_batch = default_batch(plan, path, expert_memory=expert_memory, other_bytes=kept)
        if max_batch > 1:  # the wired limit and the reported largest context are for all of them
            plan, max_context = plan_context(path, max_context, batch=max_batch, **options)
    wired = apply_wired_limit(plan) if wire_memory else None
    if wired:
        log.warning("%s", wired)
    tokenizer = Tokenizer.from_dir(path)
    args = ModelArgs.from_file(path)
    config = ServerConfig(model_id=model_id or path.name, tokenizer=tokenizer, max_context=max_context,
                          encoding=load_encoding(path), api_key=api_key, thinking=thinking,
                          exact_sampling=exact_sampling, vocab_size=args.vocab_size,
                          largest_context=min(plan.largest_context, args.max_position_embeddings))

    def load():  # on the engine's thread: MLX streams are per thread
        from ..generation.prompt_cache import open_prompt_cache
        from ..generation.speculative import resolve_draft

        model = load_model(path, expert_memory=plan.expert_memory, splits=plan.splits)
        k = resolve_draft(model, draft) if max_batch == 1 else 0
        if k:
            log.info("speculative decoding: the MTP block drafts %d token(s) per step", k)
        cache = open_prompt_cache(path, kv_bits=kv_bits, **prompt_cache) if prompt_cache else None
        if cache is not None:
            log.info("prompt cache: %.1f GB in memory%s", cache.max_bytes / 1e9,
                     f", {cache.disk_bytes / 1e9:.0f} GB in {cache.directory}" if cache.directory else "")
        if max_batch > 1:
            from ..generation.batch import Batcher

            log.info("batching up to %d requests (speculative decoding is off when batching)", max_batch)
            return Batcher(model, tokenizer, max_batch=max_batch, max_context=max_context,
                           largest_context=plan.largest_context, kv_bits=kv_bits,
                           prefill_chunk=plan.run_chunk, prompt_cache=cache)
        return Session(model, tokenizer, max_context=max_context,
                       largest_context=plan.largest_context, kv_bits=kv_bits,
                       prefill_chunk=plan.run_chunk, draft=k, prompt_cache=cache)

    engine = Engine(load, max_batch=max_batch)
    # The grammar engine's view of the vocabulary takes about a second to build: do it now, not
    # in the first request that asks for a tool call or JSON.
    threading.Thread(target=grammar_tokenizer, args=(tokenizer, args.vocab_size), daemon=True).start()
    origins = [o if o == "*" else normal_origin(o) for o in cors_origins]
    app = create_app(engine, config, cors_origins=origins, hosts=hosts_for(host, allow_hosts))
    return engine, app, config


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_context: int | None = None, *, model_id: str | None = None, kv_bits: int | None = None,
          prefill_chunk: int = 512, thinking: bool = True, exact_sampling: bool = False,
          log_level: str = "info", draft: int | None = None,
          expert_memory: int | str | None = None, prompt_cache: dict | None = None,
          max_batch: int | None = None, cors_origins: Sequence[str] = (),
          allow_hosts: Sequence[str] = ()):
    """`create_server`, load the model, then run uvicorn until interrupted. A model that fails
    to load is raised (LoadError, ConfigError) or exits with the reason before any port is bound.
    Returns once the server has stopped and the engine's thread has ended."""
    import uvicorn

    from ..config import ConfigError
    from ..model.weights import LoadError
    from .guard import is_loopback

    _log_to_stderr(log_level)
    engine, app, config = create_server(model_path, api_key=api_key, max_context=max_context,
                                        model_id=model_id, kv_bits=kv_bits,
                                        prefill_chunk=prefill_chunk, thinking=thinking,
                                        exact_sampling=exact_sampling, draft=draft,
                                        expert_memory=expert_memory, prompt_cache=prompt_cache,
                                        max_batch=max_batch, host=host, cors_origins=cors_origins,
                                        allow_hosts=allow_hosts)
    if not is_loopback(host) and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use "
                    "the model", host)
    log.info("loading %s", model_path)
    engine.start()
    try:
        engine.loaded.wait()
        if (e := engine.error) is not None:
            if isinstance(e, (LoadError, ConfigError)):
                raise e
            raise SystemExit(f"error: could not load {model_path}: {type(e).__name__}: {e}")
        log.info("serving %s as %r on http://%s:%d/v1 with %s tokens of context",
                 model_path, config.model_id, host, port, f"{config.max_context:,}")
        with _sigterm_exits():
            uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (launchd, systemd, `docker stop`) stops the server as Ctrl-C does: uvicorn lets the
    replies end, then raises the signal again once the server is down, and here that becomes a
    normal exit (status 0; exit handlers run) instead of death by the signal (143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(0)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _log_to_stderr(level: str):
    """The server's own lines (loading, prefill progress, failures) beside uvicorn's."""
    logger = logging.getLogger("mlx_dsv4")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


__all__ = ["create_server", "serve"]
