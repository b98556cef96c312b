"""Legacy `/v1/completions` (protocol.md B8): raw or FIM prompts -> an engine `Job`, and its
chunks -> `text_completion` objects, with `echo` and legacy logprobs.

With `echo` and `logprobs` the prompt's own tokens are listed before the generated ones, as
OpenAI's API listed them; their logprobs are null: the prompt is read for its last position
only (scoring every prompt position would need the model's full logits over the prompt).
"""

from __future__ import annotations

from typing import AsyncIterator

from ..generation.generate import Chunk
from ..text import chat_format
from .engine import Job, Progress
from .protocol import ServerConfig, budget, ending, reported, token_ids, token_text, usage
from .schema import APIError, CompletionRequest, check_ids


def completion_job(req: CompletionRequest, cfg: ServerConfig) -> Job:
    tok, prompt = cfg.tokenizer, req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "Only one prompt per request is supported.", code="unsupported_parameter",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        ids = list(prompt)
        check_ids(ids, cfg.vocab, "prompt" if prompt is req.prompt else "prompt[0]")
    elif req.suffix:
        ids = tok.encode_segments(chat_format.fim_segments(prompt, req.suffix))
    else:  # raw text: FIM and chat token strings in it are tokens (B8)
        ids = tok.encode(prompt, allow_control=True)
    if not ids or ids[0] != tok.bos_token_id:
        ids = [tok.bos_token_id] + ids
    sampling = req.sampling(cfg.vocab)
    stops = token_ids(tok, chat_format.FIM_BEGIN, chat_format.FIM_HOLE, chat_format.FIM_END, "<|EOT|>")
    sampling.update(max_tokens=budget(len(ids), req.max_tokens, cfg, cfg.completion_max_tokens, "prompt"),
                    logprobs=req.logprobs or 0, stop_token_ids=stops)
    return Job(ids, sampling)


class CompletionReply:
    """Legacy completions: text as generated, optional echo and legacy logprobs (B8)."""

    def __init__(self, job: Job, req: CompletionRequest, tokenizer):
        self.job, self.tok, self.n = job, tokenizer, req.logprobs
        self.ender = ending(job, tokenizer)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
        text = prompt if isinstance(prompt, str) else tokenizer.decode(job.ids[1:])
        self.echo = text if req.echo else ""  # the prompt as given, not its FIM form
        self.offset = len(self.echo)
        self.echoed = None  # the prompt's tokens, listed once before the generated ones
        if req.echo and self.n is not None:
            ids = tokenizer.encode(prompt, allow_control=True) if isinstance(prompt, str) else list(prompt)
            texts = [token_text(tokenizer, t)[0] for t in ids]
            offsets, at = [], 0
            for t in ids:
                offsets.append(at)
                at += len(tokenizer.decode([t]))
            self.echoed = {"tokens": texts, "token_logprobs": [None] * len(ids),
                           "top_logprobs": [None] * len(ids), "text_offset": offsets}

    def choice(self, chunk: Chunk, text: str) -> dict:
        lp = None
        if self.n is not None and chunk.logprob is not None and not self.ender(chunk):
            lp = {"tokens": [token_text(self.tok, chunk.token)[0]], "token_logprobs": [reported(chunk.logprob)],
                  "top_logprobs": [{token_text(self.tok, t)[0]: reported(v) for t, v in chunk.top_logprobs[: self.n]}],
                  "text_offset": [self.offset]}
        if self.echoed is not None:
            echoed, self.echoed = self.echoed, None
            lp = {k: echoed[k] + (lp[k] if lp else []) for k in echoed}
        self.offset += len(chunk.text)
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason}

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
