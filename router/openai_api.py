"""The OpenAI-compatible HTTP API of the router (FastAPI).

/v1/completions and /v1/chat/completions, streaming (SSE ending with `data: [DONE]`, optional usage
chunk) and not; /v1/models; /health; /metrics; /afd/v1/cluster. Errors use OpenAI's error body so
official clients raise the matching exception class.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from afd.errors import AfdError, RequestError
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from router.backend import GenerationBackend, GenerationFailed, GenerationRequest, NoCapacity, Overloaded
from router.metrics import RouterMetrics
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.text_stream import TextStream

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class ApiConfig:
    """What the HTTP layer needs to know about the served model."""

    model_name: str
    """Name clients must send in `model` (vLLM's --served-model-name)."""
    max_model_len: int
    """Prompt plus output tokens, at most."""
    vocab_size: int
    """Token ids in prompts must be below this."""
    api_key: str | None = None
    """Bearer token required on /v1 routes (vLLM's --api-key); None = open."""


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

    # ---- validation ------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", "BadRequestError")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "BadRequestError", "prompt")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary", "BadRequestError", "prompt")
        return ids

    def _max_tokens(self, prompt_len: int, requested: int | None, default: int | None) -> int:
        room = self.config.max_model_len - prompt_len
        wanted = requested if requested is not None else (min(default, room) if default else room)
        if room < 1 or wanted > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, you "
                f"requested {prompt_len + max(wanted, 1)} tokens ({prompt_len} in the prompt, {max(wanted, 1)} "
                "in the completion). Please reduce the length of the prompt or completion.",
                "BadRequestError",
                "max_tokens",
            )
        return wanted

    # ---- generation --------------------------------------------------------------------------------------
    async def _run(
        self, index: int, prompt_ids: list[int], params: SamplingParams, stops: list[str], events: asyncio.Queue
    ) -> None:
        """Generate one choice, putting (index, text delta, finish_reason) on `events`."""
        request_id = uuid.uuid4().hex
        request = GenerationRequest(request_id, prompt_ids, params)
        text = TextStream(self.tokenizer, stops)
        start = last = time.monotonic()
        first = True
        generated = 0
        label = self.metrics.model_name
        try:
            async for event in self.backend.generate(request):
                now = time.monotonic()
                if event.token_ids:
                    if first:
                        self.metrics.ttft.labels(label).observe(now - start)
                        first = False
                    elif len(event.token_ids):
                        gap = (now - last) / len(event.token_ids)
                        for _ in event.token_ids:
                            self.metrics.itl.labels(label).observe(gap)
                    last = now
                    generated += len(event.token_ids)
                delta = text.add(event.token_ids)
                if text.stopped:
                    await self.backend.abort(request_id)
                    await events.put((index, delta, "stop", generated))
                    break
                if event.finished:
                    delta += text.finish()
                    await events.put((index, delta, event.finish_reason or "stop", generated))
                    break
                await events.put((index, delta, None, generated))
            else:
                raise GenerationFailed("the attention node ended the stream without finishing the request")
        except BaseException:
            await self.backend.abort(request_id)
            raise
        finally:
            self.metrics.e2e.labels(label).observe(time.monotonic() - start)
            self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))
            self.metrics.generation_tokens.labels(label).inc(generated)

    async def _choices(
        self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]
    ) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """Merge the event streams of all choices; cancels them all if the consumer stops early."""
        events: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._run(i, ids, p, stops, events))
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        remaining = len(tasks)
        try:
            while remaining:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    [getter, *[t for t in tasks if not t.done()]], return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    for task in tasks:
                        if task.done() and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
                    continue
                item = getter.result()
                if item[2] is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _prepare(self, prompts: list[list[int]], body: Any, requested: int | None, default: int | None):
        stops = body.stop_strings()
        params = [body.sampling_params(self._max_tokens(len(ids), requested, default)) for ids in prompts]
        return params, stops

    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        prompts = [self._tokenize(p) for p in body.prompts()]
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
        )

    async def chat(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; use /v1/completions with token ids", "BadRequestError")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        prompt = self._tokenize(self.tokenizer.encode(text, add_special_tokens=False))
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
            body, "chat.completion", response_id, created, [prompt], params, stops, choices, chunk, final
        )

    async def _respond(self, body, kind, response_id, created, prompts, params, stops, choices, chunk, final):
        model = self.config.model_name
        if not body.stream:
            async with contextlib.aclosing(self._choices(prompts, params, stops)) as stream:
                async for index, delta, finish, generated in stream:
                    choice = choices[index]
                    choice.text += delta
                    choice.completion_tokens = generated
                    choice.finish_reason = finish or choice.finish_reason
            for c in choices:
                self.metrics.request_success.labels(model, c.finish_reason or "abort").inc()
            return JSONResponse(
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
            first = await _first(stream)
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


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(service: OpenAIService, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="AFD router", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # type: ignore[no-untyped-def]
        key = service.config.api_key
        if key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _error(401, "invalid or missing API key", "AuthenticationError")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _error(400, details or "invalid request body", "BadRequestError")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc), "BadRequestError")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        service.metrics.requests_rejected.labels(service.config.model_name, "queue_full").inc()
        return _error(429, str(exc), "RateLimitError")

    @app.exception_handler(NoCapacity)
    async def no_capacity(_: Request, exc: NoCapacity) -> JSONResponse:
        service.metrics.requests_rejected.labels(service.config.model_name, "no_capacity").inc()
        return _error(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(AfdError)
    async def failed(_: Request, exc: AfdError) -> JSONResponse:
        return _error(500, str(exc), "InternalServerError")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await service.completions(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return await service.chat(body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": service.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "afd",
            "max_model_len": service.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if ready() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/afd/v1/cluster")
    async def cluster() -> dict[str, Any]:
        return service.cluster_info()

    return app
