"""The OpenAI-compatible HTTP API of the router (FastAPI).

/v1/completions and /v1/chat/completions, streaming (SSE ending with `data: [DONE]`, optional usage
chunk) and not; /v1/models; /health; /metrics; /afd/v1/cluster. Errors use OpenAI's error body so
official clients raise the matching exception class.

Every answer of this server is either a documented success or an OpenAI error body, including a 500 for a
bug: the outermost layer (`_HttpGuard`, a plain ASGI middleware) catches what escapes the app, logs it with
its traceback and answers in the error shape, so uvicorn never sees an exception and never resets the
client's keep-alive connection. The same layer checks the API key and limits the request body while it is
read (a 50 MB body is refused after the first chunk past the limit, not after it sits in memory).

Work that grows with the prompt (chat template, tokenisation) runs on one worker thread, not on the event
loop: the loop keeps answering /health and the control plane's heartbeats meanwhile, and at most one big
prompt is being tokenised at a time (its memory is the bound). A non-streaming request whose client goes
away is aborted, as a stream is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afd.errors import AfdError, ConfigError, RequestError
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from router.backend import GenerationBackend, GenerationFailed, GenerationRequest, NoCapacity, Overloaded
from router.metrics import RouterMetrics
from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from router.text_stream import TextStream

log = logging.getLogger("afd.router")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
DEFAULT_MAX_REQUEST_BODY_BYTES = 2 * 1024 * 1024
"""2 MiB: a 128k-token context as text (~0.5 MB) or as JSON token ids (~1 MB) fits; tokenising 2 MB of text
takes about 0.5 s and 170 MB on one core, which is the most one request may cost the router."""
_T = TypeVar("_T")


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
    """Bearer token required on /v1 and /afd routes (vLLM's --api-key); None = open."""
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    """Larger request bodies get a 413 before they are read in full."""
    protect_metrics: bool = False
    """Require the API key on /metrics too (off by default, as in vLLM, so Prometheus scrapes without it)."""

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ConfigError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")


class ErrorInfo(BaseModel):
    message: str
    type: str
    """OpenAI's error class name: BadRequestError, AuthenticationError, NotFoundError, ..."""
    param: str | None = None
    code: int
    """The HTTP status."""


class ErrorResponse(BaseModel):
    """Body of every non-2xx answer (OpenAI's shape)."""

    error: ErrorInfo


class _ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


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

    # ---- validation ------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of one prompt, checked against the vocabulary and the context (runs off the loop)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", "BadRequestError")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        return self._check_ids(ids)

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", "BadRequestError", "prompt")
        if len(ids) >= self.config.max_model_len:  # no room for one output token: refuse before the vocab scan
            raise ApiError(
                400,
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, your "
                f"prompt has {len(ids)} tokens. Please reduce the length of the prompt.",
                "BadRequestError",
                "prompt",
            )
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary", "BadRequestError", "prompt")
        return ids

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Render the chat template and tokenise it (runs off the loop)."""
        assert self.tokenizer is not None
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        return self._check_ids(self.tokenizer.encode(text, add_special_tokens=False))

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
    ) -> AsyncGenerator[tuple[int, str, str | None, int], None]:
        """Merge the event streams of all choices; cancels them all if the consumer stops early."""
        events: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._run(i, ids, p, stops, events))
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        remaining = len(tasks)
        getter: asyncio.Future | None = None
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
            if getter is not None:
                getter.cancel()  # cancelled while waiting: do not leave the queue read pending
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _prepare(self, prompts: list[list[int]], body: Any, requested: int | None, default: int | None):
        stops = body.stop_strings()
        params = [body.sampling_params(self._max_tokens(len(ids), requested, default)) for ids in prompts]
        return params, stops

    async def completions(self, body: CompletionRequest, request: Request | None = None) -> Response:
        self._check_model(body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        raw = body.prompts()
        prompts = await self._off_loop(lambda: [self._tokenize(p) for p in raw])
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
        self._check_model(body.model)
        if (reason := body.unsupported()) is not None:
            raise ApiError(400, reason, "BadRequestError")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; use /v1/completions with token ids", "BadRequestError")
        prompt = await self._off_loop(lambda: self._chat_prompt(body))
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
            await _unless_disconnected(collect(), request)
            for c in choices:
                self.metrics.request_success.labels(model, c.finish_reason or "abort").inc()
            return _json(
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
            first = await _unless_disconnected(_first(stream), request)
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


async def _until_disconnect(receive: Receive) -> None:
    """Returns when the client has closed the connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Awaitable[_T], request: Request | None) -> _T:
    """Await `work`, cancelling it (and raising _ClientGone) if the client disconnects first."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _ClientGone
    finally:
        watcher.cancel()
        task.cancel()


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON: text the client sent (a model name, say) may hold lone surrogates, which UTF-8 cannot carry.
    return Response(json.dumps(content).encode("ascii"), status, headers, media_type="application/json")


def _error(
    status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return _json({"error": {"message": message, "type": kind, "param": param, "code": status}}, status, headers)


_ERROR_KINDS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
"""Body bytes read and dropped after a refusal, so the client can read the answer and keep its connection;
past this the connection is closed instead."""


class _HttpGuard:
    """The outermost layer of the app: API key, request-body limit, and the last resort for exceptions.

    A pure ASGI middleware (not @app.middleware, whose wrapper hides the client's disconnect from
    endpoints). It sits inside Starlette's ServerErrorMiddleware, so an exception never reaches it or
    uvicorn: either would answer in plain text and reset the keep-alive connection.
    """

    def __init__(self, app: ASGIApp, config: ApiConfig) -> None:
        self.app = app
        self.config = config

    def _needs_key(self, path: str) -> bool:
        if not self.config.api_key:
            return False
        return path.startswith(("/v1", "/afd/")) or (self.config.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked_send(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self._needs_key(scope["path"]):
                given = headers.get("authorization", "").encode("latin-1")
                if not hmac.compare_digest(given, f"Bearer {self.config.api_key}".encode()):
                    await self._refuse(401, "invalid or missing API key", receive, scope, tracked_send)
                    return
            replay = await self._read_body(headers, scope, receive, tracked_send)
            if replay is not None:
                await self.app(scope, replay, tracked_send)
        except (_ClientGone, ClientDisconnect):
            return  # nobody left to answer; the generation was aborted where it ran
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            with contextlib.suppress(Exception):
                if not started:
                    response = _error(500, "internal server error; see the router's log", "InternalServerError")
                    await response(scope, receive, tracked_send)
                elif not finished:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _read_body(self, headers: dict[str, str], scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The whole body, counted while it arrives; None when the request was refused (413/400)."""
        limit = self.config.max_request_body_bytes
        too_large = (
            f"the request body is larger than this server's limit of {limit} bytes "
            "(the router's --max-request-body-bytes)"
        )
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(400, f"invalid Content-Length {declared!r}", receive, scope, send)
                return None
            if int(declared) > limit:
                await self._refuse(413, too_large, receive, scope, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                more = bool(message.get("more_body", False))
                await self._refuse(413, too_large, receive, scope, send, already=size, more=more)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return buffered
            return await receive()  # after the body: the disconnect, which endpoints watch for

        return replay

    async def _refuse(
        self,
        status: int,
        message: str,
        receive: Receive,
        scope: Scope,
        send: Send,
        already: int = 0,
        more: bool = True,
    ) -> None:
        """Answer `status` without keeping the body: drop what is still coming (`more`), up to a bound."""
        drained = already
        while more and drained <= _DRAIN_LIMIT_BYTES:
            chunk = await receive()
            if chunk["type"] == "http.disconnect":
                return
            drained += len(chunk.get("body", b""))
            more = chunk.get("more_body", False)
        headers = {"connection": "close"} if more else None
        await _error(status, message, _ERROR_KINDS[status], headers=headers)(scope, receive, send)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer (all with the OpenAI error body)."""
    why = {
        400: "The request is invalid (schema, context length, vocabulary, unsupported feature).",
        401: "The API key is missing or wrong (only when the router has one).",
        404: "The model named in the request is not served here.",
        413: "The request body is larger than the router's limit.",
        429: "The router's queue is full; retry later.",
        500: "The request failed inside the cluster.",
        503: "No attention node could take the request in time.",
    }
    return {code: {"model": ErrorResponse, "description": why[code]} for code in codes}


def _openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every body; this server answers a schema violation with a 400 instead."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(service: OpenAIService, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title="AFD router", docs_url=None, redoc_url=None)
    app.add_middleware(_HttpGuard, config=service.config)
    app.openapi = _openapi_without_422(app)  # type: ignore[method-assign]
    keyed = (401,) if service.config.api_key else ()
    generation = _responses(400, *keyed, 404, 413, 429, 500, 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        def where(loc: tuple[Any, ...]) -> str:  # without pydantic's union-member tags like "list[str]"
            return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and "[" in p))

        reasons = dict.fromkeys(f"{where(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        details = "; ".join(reasons)
        return _error(400, details or "invalid request body", "BadRequestError")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = _ERROR_KINDS.get(exc.status_code, "APIError")
        return _error(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {}))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return _error(400, str(exc), "BadRequestError")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> Response:
        service.metrics.requests_rejected.labels(service.config.model_name, "queue_full").inc()
        return _error(429, str(exc), "RateLimitError")

    @app.exception_handler(NoCapacity)
    async def no_capacity(_: Request, exc: NoCapacity) -> Response:
        service.metrics.requests_rejected.labels(service.config.model_name, "no_capacity").inc()
        return _error(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(AfdError)
    async def failed(_: Request, exc: AfdError) -> Response:
        return _error(500, str(exc), "InternalServerError")

    stream_doc = {"text/event-stream": {"schema": {"type": "string", "description": "SSE chunks, then [DONE]"}}}

    @app.post(
        "/v1/completions",
        responses={200: {"model": CompletionResponse, "content": stream_doc}, **generation},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post(
        "/v1/chat/completions",
        responses={200: {"model": ChatCompletionResponse, "content": stream_doc}, **generation},
    )
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.chat(body, request)

    @app.get("/v1/models", response_model=ModelList, responses=_responses(*keyed))
    async def models() -> ModelList:
        card = ModelCard(id=service.config.model_name, max_model_len=service.config.max_model_len)
        return ModelList(data=[card])

    @app.get(
        "/health",
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "No request could be served now."}},
    )
    async def health() -> Response:
        ok = ready()
        return _json({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    metrics_doc = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text format"}}}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": metrics_doc, "description": "Prometheus metrics"},
            **(_responses(*keyed) if service.config.protect_metrics else {}),
        },
    )
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/afd/v1/cluster", responses=_responses(*keyed))
    async def cluster() -> dict[str, Any]:
        return service.cluster_info()

    return app
