"""Who may talk to a node: a shared cluster token on every gRPC call, optionally mutual TLS.

Every node (router, attention, FFN) and every client of theirs holds the same token. Clients send it as
`authorization: Bearer <token>` metadata; servers refuse a call without it with UNAUTHENTICATED.
The standard health service (grpc.health.v1) is exempt so Kubernetes probes and load balancers, which
cannot carry the token, still see whether a node is up.

Why metadata and not gRPC call credentials: grpc only sends call credentials over TLS channels, and a
cluster on a private network often runs without TLS; metadata works on both. With `TlsFiles` the
channel itself is mutually authenticated too (server and client certificates signed by the cluster CA).

The token comes from a file (how a Kubernetes Secret is mounted) or a value in the node's config,
never from an environment variable, so it does not leak into `ps e` or crash dumps of child processes.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from afd.errors import ConfigError

AUTH_HEADER = "authorization"
"""Metadata key of the token (lower case: gRPC metadata keys are)."""
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods served without a token."""
MIN_TOKEN_CHARS = 16
"""A shorter shared secret is too easy to guess; refused at configuration."""
REFUSE_GRACE_S = 0.2
"""How long a refused call waits, its request unread, before the UNAUTHENTICATED status (see _refuse)."""

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for mutual TLS: this node's certificate and key, and the CA that signs every node's."""

    cert_file: Path
    """This node's certificate chain (PEM)."""
    key_file: Path
    """Private key of cert_file (PEM)."""
    ca_file: Path
    """CA certificate(s) that peers' certificates must chain to (PEM)."""
    server_name_override: str | None = None
    """Expected name in the server certificate when it differs from the dialled host (tests, IP addresses)."""

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert_file.read_bytes(), self.key_file.read_bytes(), self.ca_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file: {exc}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace removed, as Secrets often end with a newline)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read cluster token file {path}: {exc}") from exc
    if not token:
        raise ConfigError(f"cluster token file {path} is empty")
    return token


@dataclass(frozen=True, slots=True)
class ClusterAuth:
    """How this process authenticates its gRPC servers and channels. `ClusterAuth()` means no auth at all."""

    token: str | None = field(default=None, repr=False)
    """Shared cluster token; None disables token checks (single-user development only)."""
    tls: TlsFiles | None = None
    """Mutual TLS on every channel when set."""

    def __post_init__(self) -> None:
        if self.token is not None:
            if len(self.token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"the cluster token must have at least {MIN_TOKEN_CHARS} characters")
            if not self.token.isprintable() or any(c.isspace() for c in self.token):
                raise ConfigError("the cluster token must be printable and contain no whitespace")

    @classmethod
    def from_config(
        cls, token: str | None = None, token_file: str | Path | None = None, tls: TlsFiles | None = None
    ) -> ClusterAuth:
        """From a token value or a token file (not both)."""
        if token is not None and token_file is not None:
            raise ConfigError("give the cluster token as a value or as a file, not both")
        if token_file is not None:
            token = read_token_file(token_file)
        return cls(token=token, tls=tls)

    # -- client side ---------------------------------------------------------------------------

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata to attach to a call (empty without a token)."""
        return ((AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def aio_channel(self, target: str, options: ChannelOptions = ()) -> grpc.aio.Channel:
        """An asyncio channel to `target` ("host:port") that sends the token on every call."""
        interceptors = _client_interceptors(self.call_metadata()) if self.token else None
        if self.tls is not None:
            options = _with_name_override(options, self.tls)
            return grpc.aio.secure_channel(
                target, self.tls.channel_credentials(), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

    def channel(self, target: str, options: ChannelOptions = ()) -> grpc.Channel:
        """A blocking channel to `target` that sends the token on every call."""
        if self.tls is not None:
            channel = grpc.secure_channel(
                target, self.tls.channel_credentials(), options=_with_name_override(options, self.tls)
            )
        else:
            channel = grpc.insecure_channel(target, options=options)
        if self.token:
            return grpc.intercept_channel(channel, _SyncMetadataInterceptor(self.call_metadata()))
        return channel

    # -- server side ---------------------------------------------------------------------------

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for `grpc.aio.server(interceptors=...)` (none without a token)."""
        return [TokenServerInterceptor(self.token)] if self.token else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` ("host:port", port 0 for any) with TLS if configured; returns the bound port."""
        if self.tls is not None:
            return server.add_secure_port(address, self.tls.server_credentials())
        return server.add_insecure_port(address)


def _with_name_override(options: ChannelOptions, tls: TlsFiles) -> list[tuple[str, Any]]:
    out = list(options)
    if tls.server_name_override:
        out.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return out


# ---------------------------------------------------------------------------------------------------
# Server interceptor
# ---------------------------------------------------------------------------------------------------


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the cluster token (UNAUTHENTICATED), except the health service."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                presented = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(presented, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(EXEMPT_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):  # type: ignore[attr-defined]
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing_handler(handler, method)


def _refusing_handler(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call (UNAUTHENTICATED) without reading a byte of its request.

    Whatever kind the method is, the refusal is served by a request-*streaming* handler: grpc runs a
    unary-request handler only after it has received (buffered and deserialised) the whole request,
    up to the server's message size limit, so an anonymous peer could make the node hold hundreds of
    MiB per call. A streaming handler that never iterates its requests leaves them unread; HTTP/2 flow
    control stops the peer after one window (64 KiB). The response kind does not matter on the wire:
    a refused call carries no response message, only the status.
    """
    message = f"{method}: missing or wrong cluster token"

    async def refuse(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await _refuse(context, message)

    async def refuse_stream(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await _refuse(context, message)
        yield  # pragma: no cover - makes this an async generator, as response-streaming handlers are

    if handler is not None and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    # unknown methods too: still answer UNAUTHENTICATED, revealing nothing about the API
    return grpc.stream_unary_rpc_method_handler(refuse)


async def _refuse(context: grpc.aio.ServicerContext, message: str) -> None:
    # grpc's asyncio client turns a write that fails because the call already ended into INTERNAL
    # ("Failed execute_batch: SendMessageOperation") instead of the status the server sent. Its first
    # writes complete locally within milliseconds (grpc core buffers a message and flow control holds
    # it unread), so a short pause before the status gives the caller the real reason - UNAUTHENTICATED -
    # without this side ever reading the request. Nothing here can be waited on instead: observing the
    # peer's message would mean reading it.
    await asyncio.sleep(REFUSE_GRACE_S)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)


# ---------------------------------------------------------------------------------------------------
# Client interceptors
# ---------------------------------------------------------------------------------------------------


def _merged(details: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    """A copy of `details` with `extra` metadata added (the auth key replaced, not duplicated)."""
    existing = [(k, v) for k, v in (details.metadata or ()) if k != AUTH_HEADER]
    return details._replace(metadata=grpc.aio.Metadata(*existing, *extra))


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_merged(client_call_details, self._metadata), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_merged(client_call_details, self._metadata), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_merged(client_call_details, self._metadata), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_merged(client_call_details, self._metadata), request_iterator)


def _client_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    # One object per call type: grpc.aio files each interceptor under the first call type it matches, so
    # a single class implementing all four would only ever see unary-unary calls.
    return [_AioUnaryUnary(metadata), _AioUnaryStream(metadata), _AioStreamUnary(metadata), _AioStreamStream(metadata)]


class _SyncMetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        existing = [(k, v) for k, v in (details.metadata or ()) if k != AUTH_HEADER]
        return _SyncCallDetails(
            details.method,
            details.timeout,
            (*existing, *self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
