"""The outermost layer of the router's HTTP app: the API key, the request-body limit, and the last resort.

Every answer of this server is either a documented success or an OpenAI error body, including a 500 for a
bug: this layer (a plain ASGI middleware) catches what escapes the app, logs it with its traceback and
answers in the error shape, so uvicorn never sees an exception and never resets the client's keep-alive
connection. The same layer checks the API key and limits the request body while it is read (a 50 MB body is
refused after the first chunk past the limit, not after it sits in memory).
"""

from __future__ import annotations

import contextlib
import hmac
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.api_config import ApiConfig
from router.api_errors import ERROR_KINDS, error_response
from router.disconnect import ClientGone

log = logging.getLogger("afd.router")

_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
"""Body bytes read and dropped after a refusal, so the client can read the answer and keep its connection;
past this the connection is closed instead."""


class HttpGuard:
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
        # /tokenize and /detokenize cost CPU per byte sent, so they are behind the key as the API is;
        # /health and /version stay open (probes).
        protected = ("/v1", "/afd/", "/tokenize", "/detokenize")
        return path.startswith(protected) or (self.config.protect_metrics and path == "/metrics")

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
        except (ClientGone, ClientDisconnect):
            return  # nobody left to answer; the generation was aborted where it ran
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            with contextlib.suppress(Exception):
                if not started:
                    response = error_response(500, "internal server error; see the router's log", "InternalServerError")
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
                raise ClientGone
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
        await error_response(status, message, ERROR_KINDS[status], headers=headers)(scope, receive, send)
