"""Cluster token configuration and the server interceptor's decisions (no network: fake call details)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from afd.errors import ConfigError
from afd.wire import auth
from afd.wire.auth import AUTH_HEADER, ClusterAuth, TokenServerInterceptor, read_token_file

TOKEN = "0123456789abcdef-cluster"


class Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class Untouchable:
    """Requests of a refused call: reading them is the defect."""

    def __aiter__(self) -> Any:
        raise AssertionError("a refused call's request was read")

    def __iter__(self) -> Any:
        raise AssertionError("a refused call's request was read")


def decide(method: str, metadata: tuple[tuple[str, str], ...], streaming: bool = False) -> tuple[str, Any]:
    """Run the interceptor; returns ("served", handler) or ("refused", status code)."""
    real = (
        grpc.stream_stream_rpc_method_handler(lambda it, ctx: None)
        if streaming
        else grpc.unary_unary_rpc_method_handler(lambda r, ctx: None)
    )

    async def continuation(_details: Any) -> grpc.RpcMethodHandler:
        return real

    async def run() -> tuple[str, Any]:
        handler = await TokenServerInterceptor(TOKEN).intercept_service(continuation, Details(method, metadata))
        if handler is real:
            return "served", handler
        # refused unread: always a request-streaming handler (grpc reads a unary request in full before
        # its handler runs), whose requests are never touched
        assert (handler.request_streaming, handler.response_streaming) == (True, streaming)
        context = FakeContext()
        behaviour = handler.stream_stream if streaming else handler.stream_unary
        with pytest.raises(Aborted):
            result = behaviour(Untouchable(), context)
            if hasattr(result, "__anext__"):
                await result.__anext__()
            else:
                await result
        return "refused", context.code

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def no_refusal_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "REFUSE_GRACE_S", 0.0)


@pytest.mark.parametrize(
    ("metadata", "outcome"),
    [
        ((), ("refused", grpc.StatusCode.UNAUTHENTICATED)),
        (((AUTH_HEADER, "Bearer wrong-token-wrong-token"),), ("refused", grpc.StatusCode.UNAUTHENTICATED)),
        (((AUTH_HEADER, TOKEN),), ("refused", grpc.StatusCode.UNAUTHENTICATED)),  # no "Bearer "
        ((("x-other", f"Bearer {TOKEN}"),), ("refused", grpc.StatusCode.UNAUTHENTICATED)),
        (((AUTH_HEADER, f"Bearer {TOKEN}"),), ("served", None)),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_interceptor_requires_the_token(metadata, outcome, streaming: bool) -> None:
    verdict, value = decide("/afd.v1.FfnData/Exchange", metadata, streaming)
    assert verdict == outcome[0]
    if verdict == "refused":
        assert value == outcome[1]


def test_health_checks_are_exempt() -> None:
    assert decide("/grpc.health.v1.Health/Check", ())[0] == "served"
    assert decide("/grpc.health.v1.HealthX/Check", ())[0] == "refused"


def test_token_from_file_or_value(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # a mounted Secret usually ends with a newline
    assert ClusterAuth.from_config(token_file=path).token == TOKEN
    assert ClusterAuth.from_config(token=TOKEN).call_metadata() == ((AUTH_HEADER, f"Bearer {TOKEN}"),)
    assert ClusterAuth().call_metadata() == () and ClusterAuth().server_interceptors() == []
    assert TOKEN not in repr(ClusterAuth(token=TOKEN)), "the secret stays out of logs"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "short"}, "at least"),
        ({"token": "has a space in it, long enough"}, "whitespace"),
        ({"token": TOKEN, "token_file": "/x"}, "not both"),
        ({"token_file": "/nonexistent/token"}, "cannot read"),
    ],
)
def test_bad_token_configuration(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterAuth.from_config(**kwargs)


def test_empty_token_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(path)
