"""`dsv4 selftest`: the whole pipeline on a tiny random model, offline, in a few seconds (on a
CPU backend's first run, a minute or two more: MLX compiles its kernels, and says so first).

Five stages, each timed with its MLX peak memory and the process's peak RSS: write a checkpoint
in the official FP8/FP4 release format (with a byte-level tokenizer of our own and DeepSeek's
V4-0731 encoder texts, packaged, so nothing is downloaded), convert it, load it, chat one turn,
and serve one streamed and one non-streamed request to the `openai` client over a real socket. The first failing stage stops the
run; its error text goes into the report. Owns no model code: every stage calls the library the
way `dsv4 convert`, `chat` and `serve` do.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

STAGES = ("checkpoint", "convert", "load", "chat", "serve")
RECIPE = "q4"
MAX_CONTEXT = 1024
PROMPT = "Say hello in five words."
SOURCE_DIR, MODEL_DIR = "official", f"mlx-{RECIPE}"
# Said before the chat stage when MLX's CPU kernel cache is empty: the compile took 41 s and
# 92 s (2 cores, shared) where a warm run's chat takes under a second.
FIRST_RUN = ("  first run: MLX compiles its CPU kernels during the chat stage, once (a minute or two); "
             "later runs take seconds")


class SelftestError(RuntimeError):
    """A check the selftest makes itself (as opposed to an error the library raised)."""


@dataclass
class Stage:
    name: str
    status: str = "skipped"  # "ok", "failed" or "skipped"
    seconds: float = 0.0
    peak_memory: int = 0  # MLX peak bytes during this stage
    peak_rss: int = 0  # the process's resident high-water mark so far, bytes
    detail: str = ""
    facts: dict = field(default_factory=dict)  # numbers the checks looked at, for callers and tests
    error: BaseException | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        if self.status == "skipped":
            return f"  {self.name:<10} skipped"
        mb = 1e-6
        text = (f"  {self.name:<10} {self.seconds:5.2f} s  peak {self.peak_memory * mb:6.1f} MB  "
                f"rss {self.peak_rss * mb:6.0f} MB  {'ok' if self.ok else 'FAILED'}")
        return f"{text}  ({self.detail})" if self.detail else text


@dataclass
class SelftestReport:
    stages: list[Stage]
    seconds: float
    workdir: Path  # where the files were (removed afterwards unless the caller gave it)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    @property
    def failed(self) -> Stage | None:
        return next((s for s in self.stages if s.status == "failed"), None)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def summary(self) -> str:
        if self.ok:
            return f"selftest passed in {self.seconds:.1f} s"
        bad = self.failed or next(s for s in self.stages if not s.ok)
        return f"selftest FAILED at {bad.name}: {bad.detail}"


V41_SYSTEM = "<｜System｜>"  # the one control token V4.1 adds to V4's
MODELS = ("v4", "v41")  # the tiny model's architecture: DeepSeek-V4, or V4.1 (Engram, shared pools)


def run_selftest(workdir: Path | None = None, *, log: Callable[[str], None] = print,
                 model: str = "v4") -> SelftestReport:
    """Run every stage; `workdir` (new or empty) keeps the files, otherwise a temporary one is used.
    `model` "v41" runs a tiny DeepSeek-V4.1 instead (its Engram tables read from disk)."""
    t0 = time.perf_counter()
    temp = None
    if workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="dsv4-selftest-", ignore_cleanup_errors=True)
        workdir = Path(temp.name)
    workdir = Path(workdir)
    if model not in MODELS:
        raise ValueError(f"selftest model {model!r}: choose one of {', '.join(MODELS)}")
    name = "DeepSeek-V4.1" if model == "v41" else "DeepSeek-V4"
    log(f"selftest: a tiny random {name} through convert, load, chat and serve, in {workdir}")
    stages = [Stage(name) for name in STAGES]
    run = _Run(workdir, model)
    try:
        for stage in stages:
            if stage.name == "chat" and _kernel_count(_kernel_cache()) == 0:
                log(FIRST_RUN)
            _run_stage(stage, getattr(run, stage.name))
            log(stage.line())
            if not stage.ok:
                break
        for stage in stages:
            if stage.status == "skipped":
                log(stage.line())
    finally:
        if temp is not None:
            temp.cleanup()
    report = SelftestReport(stages, time.perf_counter() - t0, workdir)
    log(report.summary())
    return report


def _run_stage(stage: Stage, step: Callable[[Stage], str]) -> None:
    mx.reset_peak_memory()
    t = time.perf_counter()
    try:
        stage.detail = step(stage)
        stage.status = "ok"
    except Exception as e:
        stage.status, stage.error, stage.detail = "failed", e, _reason(e)
    stage.seconds = time.perf_counter() - t
    stage.peak_memory = mx.get_peak_memory()
    stage.peak_rss = _peak_rss()


def _reason(e: Exception) -> str:
    # The library's errors are sentences meant for users; anything else is a bug, so name its type.
    text = str(e).strip() or type(e).__name__
    if isinstance(e, (ValueError, OSError, SelftestError)):
        return text
    return f"{type(e).__name__}: {text}"


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _kernel_cache() -> Path | None:
    """Where MLX's CPU backend keeps the kernels it compiles with the system's C++ compiler
    (`$TMPDIR/mlx/<version>/cpu`); None on a GPU, whose kernels ship compiled."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"


def _kernel_count(cache: Path | None) -> int | None:
    """Files in the kernel cache (0 if it is not there yet); None when there is no such cache."""
    if cache is None:
        return None
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestError(message)


class _Run:
    """The stages, in order; each returns its detail line and leaves what the next one needs."""

    def __init__(self, workdir: Path, model: str = "v4"):
        self.workdir, self.v41 = workdir, model == "v41"
        self.source, self.output = workdir / SOURCE_DIR, workdir / MODEL_DIR
        self.model = self.tokenizer = self.encoding = None

    def checkpoint(self, stage: Stage) -> str:
        from .text.chat_format import BUILTIN
        from .synthetic import write_official_checkpoint

        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise SelftestError(f"{self.workdir} is not empty; give a new or empty directory")
        self.source.mkdir(parents=True)
        vocab = _write_tokenizer(self.source, BUILTIN, extra=[V41_SYSTEM] if self.v41 else [])
        _write_encoder(self.source, v41=self.v41)
        config = self._config(vocab)
        write_official_checkpoint(self.source, config, seed=0, shards=2, extras=False, engram_map=False)
        text = config.get("text_config", config)
        stage.facts = {"vocab_size": vocab, "layers": text["num_hidden_layers"]}
        what = "; Engram tables, shared pools" if self.v41 else ""
        return (f"{text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
                f"{text['n_routed_experts']} experts, vocab {vocab}{what}; FP8/FP4 in 2 shards, "
                f"byte tokenizer, {'V4.1' if self.v41 else 'V4-0731'} encoder")

    def _config(self, vocab: int) -> dict:
        from .synthetic import tiny_config, tiny_v41_config

        if not self.v41:
            return tiny_config(vocab_size=vocab)
        # The converter derives the Engram token map from the tokenizer: the config must expect
        # as many classes as it has.
        from .convert.engram import derive_token_map

        classes = max(derive_token_map(self.source / "tokenizer.json")) + 1
        return tiny_v41_config(vocab_size=vocab, engram_compressed_vocab_size=classes)

    def convert(self, stage: Stage) -> str:
        from .convert import convert

        result = convert(self.source, self.output, recipe=RECIPE)
        config = json.loads((self.output / "config.json").read_text())
        _check(config.get("mlx_dsv4", {}).get("recipe") == RECIPE and "quantization" in config,
               "config.json of the converted model has no q4 quantization block")
        _check((self.output / "model.safetensors.index.json").is_file(), "no index was written")
        # The converted directory must run on its own, so the converter has to bring these along.
        from .text.chat_format import ENCODER_FILE, ENCODER_FILE_V41

        missing = [f for f in ("tokenizer.json", "tokenizer_config.json", ENCODER_FILE_V41 if self.v41 else ENCODER_FILE)
                   if not (self.output / f).is_file()]
        _check(not missing, f"the converter did not copy {', '.join(missing)}")
        shards = len(result.plan.shards)
        stage.facts = {"shards": shards, "bytes": result.plan.bytes_out}
        return f"{RECIPE}, {shards} shard{'s' * (shards != 1)}, {result.plan.bytes_out / 1e6:.1f} MB"

    def load(self, stage: Stage) -> str:
        from mlx.utils import tree_flatten

        from .text.chat_format import load_encoding, render
        from .model.weights import load

        self.model, self.tokenizer = load(self.output)
        self.encoding = load_encoding(self.output)
        _check(self.encoding is not None, "load_encoding found no encoder file in encoding/")
        _check(self.encoding.version == ("v41" if self.v41 else "0731"),
               f"load_encoding read a {self.encoding.version} encoder")
        _check((self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) == (0, 1),
               f"BOS/EOS ids are {self.tokenizer.bos_token_id}/{self.tokenizer.eos_token_id}, not 0/1")
        messages = [{"role": "user", "content": PROMPT}]
        if not self.v41:  # V4's protocol tokens are built in; V4.1's System turns are not
            _check(render(messages, thinking=True, encoding=self.encoding) == render(messages, thinking=True),
                   "the encoder renders a different prompt from the built-in encoding")
        prompt = render(messages, thinking=True, encoding=self.encoding)
        _check(self.tokenizer.decode(self.tokenizer.encode(prompt, allow_control=True)) == prompt,
               "the tokenizer does not round-trip the rendered prompt")
        _check(self.encoding.tools_tpl is not None, "the encoder has no tools template")
        tensors = tree_flatten(self.model.parameters())
        size = sum(a.nbytes for _, a in tensors)
        stage.facts = {"tensors": len(tensors), "bytes": size, "vocab_size": self.tokenizer.vocab_size}
        return (f"{len(tensors)} tensors, {size / 1e6:.1f} MB, tokenizer {self.tokenizer.vocab_size} ids, "
                f"{'V4.1' if self.v41 else 'V4-0731'} encoder read")

    def chat(self, stage: Stage) -> str:
        from .chat import Chat, Done
        from .text.chat_format import ContentDelta, ReasoningDelta
        from .generation.session import Session

        cache = _kernel_cache()
        before = _kernel_count(cache)
        session = Session(self.model, self.tokenizer, max_context=MAX_CONTEXT)
        chat = Chat(session, self.tokenizer, encoding=self.encoding,
                    sampling={"temperature": 0.0, "max_tokens": 16})
        events = list(chat.send(PROMPT))
        done = events[-1] if events and isinstance(events[-1], Done) else None
        _check(done is not None and done.finish_reason is not None, "the turn ended without a finish reason")
        tokens = done.chunk.generation_tokens
        _check(tokens >= 1, "the turn produced no tokens")
        text = "".join(e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta)))
        compiled = (_kernel_count(cache) - before) if cache is not None else 0
        stage.facts = {"tokens": tokens, "finish_reason": done.finish_reason, "text": text,
                       "tokens_per_second": done.chunk.generation_tps, "kernels_compiled": compiled}
        first = f", including compiling {compiled} CPU kernels (cached in {cache})" if compiled > 0 else ""
        return (f"{tokens} tokens, finish {done.finish_reason}, {done.chunk.generation_tps:.0f} tok/s"
                f"{first}; random weights, so the text is gibberish")

    def serve(self, stage: Stage) -> str:
        import openai
        import uvicorn

        from .serve import create_server

        # As `dsv4 serve` builds it, less the wired limit: sized for this tiny model it would
        # shrink the process's.
        engine, app, config = create_server(self.output, max_context=MAX_CONTEXT,
                                            model_id="dsv4-selftest", wire_memory=False)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               lifespan="off"))
        # Our own socket on port 0: the port is known before uvicorn starts, and never taken.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsv4-selftest-http",
                                  daemon=True)
        engine.start()
        thread.start()
        try:
            _wait_ready(engine, server, thread)
            # trust_env=False: a proxy configured for the outside world must not see 127.0.0.1.
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="selftest",
                                   max_retries=0, timeout=60,
                                   http_client=openai.DefaultHttpxClient(trust_env=False))
            with client:
                facts = _ask(client, config.model_id)
        finally:
            server.should_exit = True
            thread.join(10)
            engine.stop()
            sock.close()
        _check(not thread.is_alive(), "the server did not shut down within 10 s")
        stage.facts = dict(facts, port=port)
        return (f"127.0.0.1:{port}, reply {facts['completion_tokens']} tokens "
                f"({facts['finish_reason']}), stream {facts['stream_chunks']} chunks, clean shutdown")


def _wait_ready(engine, server, thread, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    _check(engine.loaded.wait(timeout), f"the engine did not load the model within {timeout:.0f} s")
    if engine.error is not None:
        raise SelftestError(f"the engine could not load the model: {_reason(engine.error)}")
    while not server.started:
        _check(thread.is_alive(), "uvicorn stopped while starting")
        _check(time.monotonic() < deadline, f"uvicorn did not start within {timeout:.0f} s")
        time.sleep(0.01)


def _ask(client, model: str) -> dict:
    """One non-streamed and one streamed request; check the shapes an OpenAI client relies on."""
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    choice = reply.choices[0] if reply.choices else None
    _check(choice is not None and choice.message is not None and choice.message.role == "assistant",
           "the reply has no assistant message in choices[0]")
    _check(choice.finish_reason in ("stop", "length"), f"unexpected finish_reason {choice.finish_reason!r}")
    usage = reply.usage
    _check(usage is not None and usage.prompt_tokens >= 1 and 1 <= usage.completion_tokens <= 8,
           f"unexpected usage {usage}")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    _check(len(finishes) == 1 and finishes[0] in ("stop", "length"),
           f"the stream ended with finish reasons {finishes}")
    last = chunks[-1] if chunks else None
    _check(last is not None and last.usage is not None and last.usage.completion_tokens >= 1,
           "the stream's last chunk carries no usage")
    return {"completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
            "finish_reason": choice.finish_reason, "stream_chunks": len(chunks),
            "stream_completion_tokens": last.usage.completion_tokens}


def _write_tokenizer(path: Path, encoding, extra: list[str] = ()) -> int:
    """A byte-level tokenizer with the V4 control tokens (and `extra` ones: V4.1's System token);
    returns its vocabulary size.

    BOS and EOS take ids 0 and 1 as in the release, then the tokens the chat encoding and FIM
    use, then the 256 byte symbols (no merges: every byte is one token).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from .text.chat_format import FIM_BEGIN, FIM_END, FIM_HOLE

    control = [encoding.bos, encoding.eos, encoding.user, encoding.assistant, encoding.think_open,
               encoding.think_close, encoding.dsml, encoding.latest_reminder, *encoding.tasks.values(),
               FIM_HOLE, FIM_BEGIN, FIM_END, *extra]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(control + symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # As in the release: only BOS/EOS are flagged special; the chat tokens are plain added tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control[:2]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in control[2:]])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "bos_token": encoding.bos, "eos_token": encoding.eos, "pad_token": encoding.eos}, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return tok.get_vocab_size(with_added_tokens=True)


def _write_encoder(path: Path, v41: bool = False) -> None:
    """The release's encoder file with DeepSeek's own texts (tools block, effort wording): V4-Flash
    -0731's `encoding/encoding_dsv4.py`, or V4.1's `encoding/encoding.py`, so that a selftest model
    renders every prompt a release renders, tools included."""
    from .text.chat_format import ENCODER_FILE, ENCODER_FILE_V41, reference_encoder_source

    name = ENCODER_FILE_V41 if v41 else ENCODER_FILE
    (path / name).parent.mkdir(exist_ok=True)
    (path / name).write_text(reference_encoder_source("v41" if v41 else "0731"), encoding="utf-8")
