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
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from afd.errors import AfdError
from afd.sampling_params import SamplingParams
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
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None


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
        self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]
    ) -> AsyncGenerator[ChoiceEvent, None]:
        return ChoiceGenerator(self.backend, self.metrics, self.tokenizer).stream(prompts, params, stops)

    def _prepare(self, prompts: list[list[int]], body: Any, requested: int | None, default: int | None):
        stops = body.stop_strings()
        params = [body.sampling_params(max_tokens(self.config, len(ids), requested, default)) for ids in prompts]
        return params, stops

    async def completions(self, body: CompletionRequest, request: Request | None = None) -> Response:
        check_model(self.config, body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        raw = body.prompts()
        prompts = await self._off_loop(lambda: [tokenize(self.config, self.tokenizer, p) for p in raw])
        params, stops = self._prepare(prompts, body, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [_Choice(i, len(ids)) for i, ids in enumerate(prompts)]

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        return await self._respond(
            body,
            "text_completion",
            response_id,
            created,
            prompts,
            params,
            stops,
            choices,
            chunk,
            lambda c: chunk(c.index, c.text, c.finish_reason),
            request,
        )

    async def chat(self, body: ChatCompletionRequest, request: Request | None = None) -> Response:
        check_model(self.config, body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; use /v1/completions with token ids", "BadRequestError")
        tokenizer = self.tokenizer
        prompt = await self._off_loop(lambda: chat_prompt(self.config, tokenizer, body))
        params, stops = self._prepare([prompt], body, body.requested_max_tokens(), None)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [_Choice(0, len(prompt))]
        started: set[int] = set()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", **delta}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        def final(c: _Choice) -> dict[str, Any]:
            message = {"role": "assistant", "content": c.text}
            return {"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}

        return await self._respond(
            body, "chat.completion", response_id, created, [prompt], params, stops, choices, chunk, final, request
        )

    async def _respond(  # type: ignore[no-untyped-def]
        self, body, kind, response_id, created, prompts, params, stops, choices, chunk, final, request
    ):
        model = self.config.model_name
        if not body.stream:

            async def collect() -> None:
                async with contextlib.aclosing(self._choices(prompts, params, stops)) as stream:
                    async for index, delta, finish, generated in stream:
                        choice = choices[index]
                        choice.text += delta
                        choice.completion_tokens = generated
                        choice.finish_reason = finish or choice.finish_reason

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
                }
            )
        # Start generating before the response begins, so admission errors become a proper HTTP status.
        stream = self._choices(prompts, params, stops)
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
            try:
                items = [first] if first is not None else []
                async for item in _chain(items, stream):
                    index, delta, finish, generated = item
                    choice = choices[index]
                    choice.completion_tokens = generated
                    choice.text += delta
                    if finish is not None:
                        choice.finish_reason = finish
                        self.metrics.request_success.labels(model, finish).inc()
                    payload = {
                        "id": response_id,
                        "object": chunk_kind,
                        "created": created,
                        "model": model,
                        "choices": [chunk(index, delta, finish)],
                    }
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
