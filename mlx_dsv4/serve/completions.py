"""Legacy `/v1/completions` (protocol.md B8): raw or FIM prompts -> an engine `Job`, and its
chunks -> `text_completion` objects, with `echo` and legacy logprobs.

With `echo` and `logprobs` the prompt's own tokens are listed before the generated ones, with
their logprobs, as OpenAI's API listed them (lm-eval-harness's loglikelihood requests, `echo`
with `max_tokens` 0 or 1, read them): a token gets log P(token | what the model read before it),
null only for a first token that nothing precedes. Generation reads a prompt for its last
position only, so scoring it is a second pass over the prompt (`generation.score`, on the engine
thread through the backend), which only requests with both `echo` and `logprobs` pay for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from ..generation.generate import Chunk
from ..generation.score import Scored
from ..text import chat_format
from .engine import Job, Progress
from .protocol import (ServerConfig, budget, context_error, ending, reported, token_ids, token_text,
                       usage)
from .schema import APIError, CompletionRequest, check_ids


@dataclass
class CompletionJob(Job):
    """A completion whose prompt's own tokens, `own`, are `ids[at : at + len(own)]` (after a BOS
    or FIM tokens added here). With `score_top` set (echo and logprobs asked), `run` first scores
    them, with that many alternatives each, into `scores`: a second pass over the prompt that
    only such requests pay for. `max_tokens` 0 generates nothing: the prompt alone is the reply."""

    own: list[int] = field(default_factory=list)
    at: int | None = 0  # None: `own` is not found as such in `ids`, and is not scored
    score_top: int | None = None
    scores: list[Scored | None] | None = None  # one per token of `own` (None: the first)

    def run(self, backend, **extra) -> Iterator[Chunk]:
        progress = extra.get("progress")
        if self.score_top is not None and self.own and self.at is not None and hasattr(backend, "score"):
            end = self.at + len(self.own)
            scored: list[Scored | None] = [None]  # what the model reads first follows nothing
            for part in backend.score(self.ids[:end], self.score_top):
                scored += part
                if progress:  # checks for cancellation between chunks, as prefill does
                    progress(len(scored), end)
            # Read by the reply once the first chunk arrives, which is emitted after this. The
            # first echoed token is null, as OpenAI lists it: nothing of the echoed text precedes
            # it (the BOS or FIM tokens added here are not echoed).
            self.scores = [None] + scored[self.at + 1 :]
        if self.sampling["max_tokens"] == 0:
            yield Chunk(finish_reason="length", prompt_tokens=len(self.ids))
            return
        yield from backend.generate(self.ids, **self.sampling, **extra)


def completion_job(req: CompletionRequest, cfg: ServerConfig) -> CompletionJob:
    tok, prompt = cfg.tokenizer, req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "Only one prompt per request is supported.", code="unsupported_parameter",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        ids = own = list(prompt)
        check_ids(ids, cfg.vocab, "prompt" if prompt is req.prompt else "prompt[0]")
    elif req.suffix:
        ids = tok.encode_segments(chat_format.fim_segments(prompt, req.suffix))
        own = tok.encode(prompt)  # the prefix segment: plain text, after BOS and <｜fim▁begin｜>
    else:  # raw text: FIM and chat token strings in it are tokens (B8)
        ids = own = tok.encode(prompt, allow_control=True)
    if not ids or ids[0] != tok.bos_token_id:
        ids = [tok.bos_token_id] + ids
    at = 2 if req.suffix and not isinstance(prompt, list) else len(ids) - len(own)  # FIM: BOS, begin
    sampling = req.sampling(cfg.vocab)
    stops = token_ids(tok, chat_format.FIM_BEGIN, chat_format.FIM_HOLE, chat_format.FIM_END, "<|EOT|>")
    if req.max_tokens == 0:  # the prompt alone, as OpenAI allowed (to score it with echo + logprobs)
        if len(ids) > cfg.max_context:
            raise context_error(len(ids), cfg, "prompt")
        max_tokens = 0
    else:
        max_tokens = budget(len(ids), req.max_tokens, cfg, cfg.completion_max_tokens, "prompt")
    # logprobs 0 still reports the chosen tokens' own logprobs (with no alternatives).
    sampling.update(max_tokens=max_tokens, logprobs=0 if req.logprobs is None else max(req.logprobs, 1),
                    stop_token_ids=stops)
    return CompletionJob(ids, sampling, own=own, at=at if ids[at : at + len(own)] == own else None,
                         score_top=req.logprobs if req.echo else None)


class CompletionReply:
    """Legacy completions: text as generated, optional echo and legacy logprobs (B8)."""

    def __init__(self, job: CompletionJob, req: CompletionRequest, tokenizer):
        self.job, self.tok, self.n = job, tokenizer, req.logprobs
        self.ender = ending(job, tokenizer)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
        text = prompt if isinstance(prompt, str) else tokenizer.decode(job.ids[1:])
        self.echo = text if req.echo else ""  # the prompt as given, not its FIM form
        self.offset = len(self.echo)
        self.echoed = req.echo and self.n is not None  # the prompt's tokens: listed before the first chunk

    def choice(self, chunk: Chunk, text: str) -> dict:
        lp = None
        if self.n is not None and chunk.logprob is not None and not self.ender(chunk):
            lp = {"tokens": [token_text(self.tok, chunk.token)[0]], "token_logprobs": [reported(chunk.logprob)],
                  "top_logprobs": [{token_text(self.tok, t)[0]: reported(v) for t, v in chunk.top_logprobs[: self.n]}],
                  "text_offset": [self.offset]}
        if self.echoed:
            self.echoed = False
            echoed = self._prompt_logprobs()
            lp = {k: echoed[k] + (lp[k] if lp else []) for k in echoed}
        self.offset += len(chunk.text)
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason}

    def _prompt_logprobs(self) -> dict:
        """The prompt's tokens in the legacy shape, with the logprobs the job scored (null where
        nothing precedes a token, or where the backend cannot score a prompt)."""
        job, tok = self.job, self.tok
        ids = job.own
        scores = job.scores or [None] * len(ids)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = 0
        for t, s in zip(ids, scores):
            out["tokens"].append(token_text(tok, t)[0])
            out["token_logprobs"].append(None if s is None else reported(s[0]))
            out["top_logprobs"].append(None if s is None else
                                       {token_text(tok, i)[0]: reported(v) for i, v in s[1][: self.n]})
            out["text_offset"].append(at)
            at += len(tok.decode([t]))
        return out

    async def chunks(self, chunks: AsyncIterator[Chunk], env: dict, include_usage: bool):
        last, first = None, True
        async for chunk in chunks:
            if isinstance(chunk, Progress):
                continue
            last, text = chunk, (self.echo if first else "") + chunk.text
            first = False
            out = dict(env, choices=[self.choice(chunk, text)])
            yield dict(out, usage=None) if include_usage else out
        if include_usage:
            yield dict(env, choices=[], usage=usage(last, len(self.job.ids)))

    async def fold(self, chunks: AsyncIterator[Chunk], env: dict) -> dict:
        parts, lps, choice = [], [], None
        async for c in self.chunks(chunks, env, include_usage=True):
            if c["choices"]:
                choice = c["choices"][0]
                parts.append(choice["text"])
                lps.append(choice["logprobs"])
            else:
                use = c["usage"]
        merged = None
        if self.n is not None:
            merged = {k: [x for lp in lps if lp for x in lp[k]]
                      for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        choice = {"index": 0, "text": "".join(parts), "logprobs": merged,
                  "finish_reason": choice["finish_reason"] if choice else "length"}
        return dict(env, choices=[choice], usage=use)
