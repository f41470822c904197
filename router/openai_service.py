"""The OpenAI endpoints' work: an OpenAI request becomes generation requests, their tokens an OpenAI response.

/v1/completions and /v1/chat/completions, streaming (SSE ending with `data: [DONE]`, optional usage chunk)
and not. Work that grows with the prompt (chat template, tokenisation) runs on one worker thread, not on
the event loop: the loop keeps answering /health and the control plane's heartbeats meanwhile, and at most
one big prompt is being tokenised at a time (its memory is the bound). A non-streaming request whose client
goes away is aborted, as a stream is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from afd.errors import AfdError
from afd.sampling_params import SamplingParams, TokenLogprobs
from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.api_errors import ApiError, json_response
from router.choice_streams import ChoiceEvent, ChoiceGenerator
from router.disconnect import unless_disconnected
from router.generation import GenerationBackend
from router.metrics import RouterMetrics
from router.prompt_checks import chat_prompt, check_model, max_tokens, tokenize
from router.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("afd.router")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
_T = TypeVar("_T")


@dataclass
class _Choice:
    index: int
    prompt_tokens: int
    """Counted in usage once per prompt (its first choice), as vLLM counts them with n > 1."""
    prompt_ids: list[int] = field(default_factory=list)
    echo: str = ""
    """Completions with echo: the prompt's text, put before the output."""
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    started: bool = False
    """A streamed chunk of this choice was built (the first carries the role, the echo, the prompt ids)."""
    offset: int = 0
    """text_offset of this choice's next logprobs token (completions)."""

    def add(self, event: ChoiceEvent) -> None:
        self.text += event.text
        self.completion_tokens = event.completion_tokens
        self.finish_reason = event.finish_reason or self.finish_reason
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs or ())
        if event.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = event.prompt_logprobs


class _Tokens:
    """How logprob entries name tokens: their text, or "token_id:N" (return_tokens_as_token_ids, and always for
    a checkpoint without a tokenizer)."""

    def __init__(self, tokenizer: Tokenizer | None, as_ids: bool) -> None:
        self.tokenizer = None if as_ids else tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _clamp(logprob: float) -> float:
    """-inf is not JSON: OpenAI and vLLM send -9999.0 instead."""
    return max(logprob, -9999.0)


def _completion_logprobs(
    entries: list[tuple[int, TokenLogprobs | None]], k: int, offset: int, name: _Tokens
) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs object for `entries` (token id, its logprobs or None), and the next offset.

    top_logprobs holds the sampled token and the k most likely (up to k + 1 entries, as OpenAI documents
    and vLLM sends); text_offset adds up the tokens' texts from `offset`, as vLLM does."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, lp in entries:
        text = name(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_clamp(lp.logprob))
        top = {text: _clamp(lp.logprob)}
        for t, value in lp.top[:k]:
            top.setdefault(name(t), _clamp(value))
        tops.append(top)
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
    return body, offset


def _chat_logprobs(entries: list[tuple[int, TokenLogprobs]], k: int, name: _Tokens) -> dict[str, Any]:
    """OpenAI's chat logprobs object. top_logprobs are the k most likely tokens, most likely first, as OpenAI
    defines them (vLLM lists the sampled token first, then the most likely; the two agree for greedy output)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = name(token_id)
        return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    content = [
        {**entry(token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:k]]}
        for token_id, lp in entries
    ]
    return {"content": content}


def _with_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs] | None) -> list[tuple[int, TokenLogprobs]]:
    return [(t, lp) for t, lp in zip(token_ids, logprobs or (), strict=False)]


class OpenAIService:
    """Turns OpenAI requests into generation requests and the token stream back into OpenAI responses."""

    def __init__(
        self,
        config: ApiConfig,
        tokenizer: Tokenizer | None,
        backend: GenerationBackend,
        metrics: RouterMetrics,
        cluster_info: Callable[[], dict[str, Any]],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.metrics = metrics
        self.cluster_info = cluster_info
        # One thread: the loop stays free, and one huge prompt at a time bounds the memory tokenising takes.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="afd-tokenize")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work)

    def _choices(
        self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str], include_stop: bool
    ) -> AsyncGenerator[ChoiceEvent, None]:
        generator = ChoiceGenerator(self.backend, self.metrics, self.tokenizer, include_stop)
        return generator.stream(prompts, params, stops)

    def _check_sampling(self, body: Any) -> None:
        """Checks that need the model: logit_bias keys inside the vocabulary."""
        bad = [key for key in body.logit_bias or {} if int(key) >= self.config.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"logit_bias: token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})",
                "BadRequestError",
                "logit_bias",
            )

    def _fan_out(
        self,
        prompts: list[list[int]],
        body: Any,
        requested: int | None,
        default: int | None,
        prompt_logprobs: int | None = None,
        echo: list[str] | None = None,
    ) -> tuple[list[list[int]], list[SamplingParams], list[_Choice]]:
        """One generation per choice: n per prompt, choice index prompt * n + i (vLLM's order)."""
        per_choice: list[list[int]] = []
        params: list[SamplingParams] = []
        choices: list[_Choice] = []
        for p, ids in enumerate(prompts):
            limit = max_tokens(self.config, len(ids), requested, default)
            for i in range(body.n):
                per_choice.append(ids)
                params.append(body.sampling_params(limit, i, prompt_logprobs))
                choices.append(_Choice(p * body.n + i, len(ids) if i == 0 else 0, ids, echo[p] if echo else ""))
        return per_choice, params, choices

    async def completions(self, body: CompletionRequest, request: Request | None = None) -> Response:
        check_model(self.config, body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        self._check_sampling(body)
        raw = body.prompts()
        prompts = await self._off_loop(lambda: [tokenize(self.config, self.tokenizer, p) for p in raw])
        k = body.logprobs
        echo = None
        if body.echo:
            tokenizer = self.tokenizer
            echo = [
                r if isinstance(r, str) else (tokenizer.decode(ids) if tokenizer is not None else "")
                for r, ids in zip(raw, prompts, strict=True)
            ]
        # vLLM: echo with logprobs scores the prompt too (prompt_logprobs = logprobs).
        prompt_k = k if body.echo and k is not None else None
        per_choice, params, choices = self._fan_out(
            prompts, body, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, prompt_k, echo
        )
        name = _Tokens(self.tokenizer, body.return_tokens_as_token_ids)

        def prompt_entries(c: _Choice) -> list[tuple[int, TokenLogprobs | None]]:
            scored: list[TokenLogprobs | None] = list(c.prompt_logprobs or [])
            scored += [None] * (len(c.prompt_ids) - 1 - len(scored))
            return list(zip(c.prompt_ids, [None, *scored], strict=True))

        def body_of(
            c: _Choice, text: str, entries: list[tuple[int, TokenLogprobs | None]], token_ids: list[int], first: bool
        ) -> dict[str, Any]:
            logprobs = None
            if k is not None:
                logprobs, c.offset = _completion_logprobs(entries, k, c.offset, name)
            out: dict[str, Any] = {"index": c.index, "text": text, "logprobs": logprobs}
            out["finish_reason"] = c.finish_reason
            if body.return_token_ids:
                out["token_ids"] = token_ids
                if first:
                    out["prompt_token_ids"] = c.prompt_ids
            return out

        def chunk(c: _Choice, event: ChoiceEvent) -> dict[str, Any]:
            first, c.started = not c.started, True
            text = event.text
            entries: list[tuple[int, TokenLogprobs | None]] = []
            if first and body.echo:
                text = c.echo + text
                entries += prompt_entries(c)
            outputs: list[TokenLogprobs | None] = list(event.logprobs or ())
            entries += zip(event.token_ids, outputs + [None] * (len(event.token_ids) - len(outputs)), strict=True)
            out = body_of(c, text, entries, event.token_ids, first)
            out["finish_reason"] = event.finish_reason
            return out

        def final(c: _Choice) -> dict[str, Any]:
            c.offset = 0
            entries = prompt_entries(c) if body.echo else []
            outputs: list[TokenLogprobs | None] = list(c.logprobs)
            entries += zip(c.token_ids, outputs + [None] * (len(c.token_ids) - len(outputs)), strict=True)
            return body_of(c, c.echo + c.text, entries, c.token_ids, True)

        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        return await self._respond(
            body, "text_completion", response_id, created, per_choice, params, choices, chunk, final, {}, request
        )

    async def chat(self, body: ChatCompletionRequest, request: Request | None = None) -> Response:
        check_model(self.config, body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; use /v1/completions with token ids", "BadRequestError")
        self._check_sampling(body)
        tokenizer = self.tokenizer
        prompt = await self._off_loop(lambda: chat_prompt(self.config, tokenizer, body))
        per_choice, params, choices = self._fan_out([prompt], body, body.requested_max_tokens(), None)
        k = body.num_logprobs()
        name = _Tokens(self.tokenizer, body.return_tokens_as_token_ids)

        def chunk(c: _Choice, event: ChoiceEvent) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": event.text} if event.text or event.finish_reason is None else {}
            if not c.started:
                c.started = True
                delta = {"role": "assistant", **delta}
            logprobs = None if k is None else _chat_logprobs(_with_logprobs(event.token_ids, event.logprobs), k, name)
            out = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
            if body.return_token_ids:
                out["token_ids"] = event.token_ids
            return out

        def final(c: _Choice) -> dict[str, Any]:
            message = {"role": "assistant", "content": c.text}
            logprobs = None if k is None else _chat_logprobs(_with_logprobs(c.token_ids, c.logprobs), k, name)
            out = {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
            if body.return_token_ids:
                out["token_ids"] = c.token_ids
            return out

        extra = {"prompt_token_ids": prompt} if body.return_token_ids else {}
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        return await self._respond(
            body, "chat.completion", response_id, created, per_choice, params, choices, chunk, final, extra, request
        )

    async def _respond(  # type: ignore[no-untyped-def]
        self, body, kind, response_id, created, prompts, params, choices, chunk, final, extra, request
    ):
        """extra: top-level fields of the response (and of its first streamed chunk)."""
        model = self.config.model_name
        stops = body.stop_strings()
        include_stop = body.include_stop_str_in_output
        if not body.stream:

            async def collect() -> None:
                async with contextlib.aclosing(self._choices(prompts, params, stops, include_stop)) as stream:
                    async for event in stream:
                        choices[event.index].add(event)

            # Cancelling `collect` closes the choices' streams, whose tasks abort their requests on the nodes.
            await unless_disconnected(collect(), request)
            for c in choices:
                self.metrics.request_success.labels(model, c.finish_reason or "abort").inc()
            return json_response(
                {
                    "id": response_id,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [final(c) for c in choices],
                    "usage": _usage(choices),
                    **extra,
                }
            )
        # Start generating before the response begins, so admission errors become a proper HTTP status.
        stream = self._choices(prompts, params, stops, include_stop)
        try:
            first = await unless_disconnected(_first(stream), request)
        except BaseException:
            await stream.aclose()
            raise
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def frame(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            pending_extra = dict(extra)
            try:
                items = [first] if first is not None else []
                async for event in _chain(items, stream):
                    choice = choices[event.index]
                    choice.add(event)
                    if event.finish_reason is not None:
                        self.metrics.request_success.labels(model, event.finish_reason).inc()
                    payload = {
                        "id": response_id,
                        "object": chunk_kind,
                        "created": created,
                        "model": model,
                        "choices": [chunk(choice, event)],
                        **pending_extra,
                    }
                    pending_extra = {}
                    if continuous:
                        payload["usage"] = _usage(choices)
                    yield frame(payload)
                if body.include_usage:
                    yield frame(
                        {
                            "id": response_id,
                            "object": chunk_kind,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(choices),
                        }
                    )
            except AfdError as exc:
                # Headers are gone; tell the client in-band, as vLLM does, rather than cutting the stream.
                yield frame({"error": {"message": str(exc), "type": "InternalServerError", "code": 500}})
            except Exception as exc:  # a bug: still end the stream properly, and keep the traceback in the log
                log.exception("stream %s failed", response_id)
                message = f"internal error ({type(exc).__name__}); see the router's log"
                yield frame({"error": {"message": message, "type": "InternalServerError", "code": 500}})
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


async def _first(stream: AsyncIterator[Any]) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(items: list[Any], stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item
    async for item in stream:
        yield item


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
