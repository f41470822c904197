"""A tiny OpenAI-compatible streaming server for benchmark tests (FastAPI + uvicorn in a thread).

It streams `max_tokens` tokens per request with a controlled time to the first token and between
tokens, honours `stream_options.include_usage`, fails a chosen fraction of requests (HTTP 500 or a
stream torn mid-way), can require an API key, serves GET /v1/models and, when given one, the AFD
router's GET /afd/v1/cluster. It records every request's payload and arrival time and the peak number
of streams in flight, so tests can check what a client really did.

    with FakeOpenAIServer(FakeServerBehavior(ttft_s=(0.05,), itl_s=0.02)) as server:
        ... server.base_url ... server.peak_concurrency ...
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass(frozen=True)
class FakeServerBehavior:
    """How the fake server answers."""

    ttft_s: tuple[float, ...] = (0.0,)
    """Seconds before the first token; request i (arrival order) waits ttft_s[i % len(ttft_s)]."""
    itl_s: float = 0.0
    """Seconds between consecutive tokens."""
    fail_fraction: float = 0.0
    """Share of requests that fail, spread evenly over arrival order (exactly round-down(n·f) of n)."""
    failure_mode: Literal["http_500", "broken_stream"] = "http_500"
    """HTTP 500 before streaming, or a connection torn after half the tokens."""
    send_usage: bool = True
    """Send the usage chunk when the request asks for it (False: never, to test chunk counting)."""
    model_id: str = "fake-model"
    """The one model of /v1/models."""
    vocab_size: int | None = None
    """Reported in the /v1/models entry when set."""
    max_model_len: int | None = None
    """Reported in the /v1/models entry when set."""
    cluster: dict[str, Any] | None = None
    """Body of GET /afd/v1/cluster; None: 404, like a server that is not an AFD router."""
    api_key: str | None = None
    """When set, every route needs `Authorization: Bearer <api_key>` (401 otherwise)."""


@dataclass
class FakeOpenAIServer:
    """The server; start() binds an ephemeral port on 127.0.0.1, shutdown() stops it (idempotent)."""

    behavior: FakeServerBehavior = field(default_factory=FakeServerBehavior)
    payloads: list[dict[str, Any]] = field(default_factory=list, init=False)
    arrivals: list[float] = field(default_factory=list, init=False)
    peak_concurrency: int = field(default=0, init=False)
    _in_flight: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _server: uvicorn.Server | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> FakeOpenAIServer:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="critical", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-openai-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.shutdown()
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=5.0)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _app(self) -> FastAPI:
        app = FastAPI()
        app.post("/v1/completions")(self._completions)
        app.post("/v1/chat/completions")(self._chat)
        app.get("/v1/models")(self._models)
        app.get("/afd/v1/cluster")(self._cluster)
        return app

    def _unauthorized(self, request: Request) -> Response | None:
        key = self.behavior.api_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "invalid API key", "code": 401}}, status_code=401)
        return None

    async def _models(self, request: Request) -> Response:
        if denied := self._unauthorized(request):
            return denied
        entry: dict[str, Any] = {"id": self.behavior.model_id, "object": "model", "root": self.behavior.model_id}
        if self.behavior.vocab_size is not None:
            entry["vocab_size"] = self.behavior.vocab_size
        if self.behavior.max_model_len is not None:
            entry["max_model_len"] = self.behavior.max_model_len
        return JSONResponse({"object": "list", "data": [entry]})

    async def _cluster(self, request: Request) -> Response:
        if denied := self._unauthorized(request):
            return denied
        if self.behavior.cluster is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse(self.behavior.cluster)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    def _fails(self, index: int) -> bool:
        f = self.behavior.fail_fraction
        return math.floor((index + 1) * f) > math.floor(index * f)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if denied := self._unauthorized(request):
            return denied
        payload = await request.json()
        with self._lock:
            index = len(self.payloads)
            self.payloads.append(payload)
            self.arrivals.append(time.perf_counter())
        fails = self._fails(index)
        if fails and self.behavior.failure_mode == "http_500":
            return JSONResponse({"error": {"message": "injected failure", "code": 500}}, status_code=500)
        if chat:
            prompt_tokens = len(payload["messages"][-1]["content"].split())
        else:
            prompt_tokens = len(payload["prompt"]) if isinstance(payload["prompt"], list) else 1
        usage = bool((payload.get("stream_options") or {}).get("include_usage")) and self.behavior.send_usage
        ttft = self.behavior.ttft_s[index % len(self.behavior.ttft_s)]
        events = self._events(int(payload["max_tokens"]), prompt_tokens, chat, usage, ttft, fails)
        return StreamingResponse(events, media_type="text/event-stream")

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_concurrency = max(self.peak_concurrency, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    async def _events(
        self, num_tokens: int, prompt_tokens: int, chat: bool, usage: bool, ttft: float, torn: bool
    ) -> AsyncIterator[str]:
        self._enter()
        left = False
        try:
            if chat:  # like vLLM: a role-only chunk first, which is not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await asyncio.sleep(ttft)
            for i in range(num_tokens):
                if i:
                    await asyncio.sleep(self.behavior.itl_s)
                if torn and i >= num_tokens // 2:
                    raise ConnectionAbortedError("injected torn stream")  # uvicorn drops the connection
                finish = "length" if i == num_tokens - 1 else None
                text = f" tok{i}"
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield _sse({"choices": [choice | {"finish_reason": finish}]})
            if usage:
                counts = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens}
                yield _sse({"choices": [], "usage": counts | {"total_tokens": prompt_tokens + num_tokens}})
            # Leave before [DONE]: a client may start its next request the moment it reads [DONE].
            self._leave()
            left = True
            yield "data: [DONE]\n\n"
        finally:
            if not left:
                self._leave()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
