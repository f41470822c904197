"""The life of every AFD process around its server: start, say it is ready, serve until told to stop.

The router, attention node and FFN node processes run the same way (Dynamo's engine lifecycle): `start()`
binds and registers, `serve()` returns when the server stops by itself, `shutdown()` releases everything
and is idempotent. Here: the ready file a launcher waits for, and the signal handling. The first SIGTERM or
SIGINT asks for a graceful stop (an attention node drains; the default is to shut down), a second one
shuts down at once.

The ready file is JSON with the bound ports ({"port": N} for nodes, {"http_port", "grpc_port"} for the
router), written to a temporary name and renamed, so a launcher never reads half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol


class NodeServer(Protocol):
    async def start(self) -> None:
        """Bind, load, register; raises on failure (shutdown is still safe afterwards)."""

    async def serve(self) -> None:
        """Return when the server has stopped by itself (or raise why it failed)."""

    async def shutdown(self) -> None:
        """Release everything; idempotent and safe after a failed start."""


class StopOnce:
    """The serve / request_stop / shutdown part of a server's lifecycle, for servers that stop on request.

    `serve()` waits until `request_stop()` (or `shutdown()`); `shutdown()` runs the subclass's `_close()`
    once, however often it is called.
    """

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._closed = False

    async def serve(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await self._close()

    async def _close(self) -> None:
        """Release what the server holds (subclasses); runs once, and must be safe after a failed start."""


def write_ready_file(path: Path, ports: Mapping[str, int]) -> None:
    """Write `ports` as JSON atomically (rename), so a reader never sees a partial file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(dict(ports)) + "\n")
    os.replace(partial, path)


def read_ready_file(path: Path) -> dict[str, int] | None:
    """The ports a ready file holds, or None while it does not exist yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


async def run_until_signal(
    server: NodeServer,
    ports: Callable[[], Mapping[str, int]],
    ready_file: Path | None = None,
    graceful_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Start `server`, write `ports()` to `ready_file`, serve until it stops or a signal comes, shut down.

    graceful_stop: what the first SIGTERM/SIGINT starts (it should make `serve()` return); None shuts down
    at once. A failure of `serve()` (e.g. an FFN node's NodeFailure) is re-raised after shutdown.
    """
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    graceful: asyncio.Future[object] | None = None
    try:
        await server.start()
        if ready_file is not None:
            write_ready_file(ready_file, ports())
        serving = asyncio.ensure_future(server.serve())
        while True:
            signalled = asyncio.ensure_future(signals.get())
            await asyncio.wait([serving, signalled], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                signalled.cancel()
                serving.result()  # re-raises what stopped the server
                return
            if graceful_stop is None or graceful is not None:
                serving.cancel()
                return
            graceful = asyncio.ensure_future(graceful_stop())
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.shutdown()
        if graceful is not None and not graceful.done():
            graceful.cancel()
            with contextlib.suppress(BaseException):
                await graceful
