"""Watching for a client that goes away before its answer is ready, so its generation is aborted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from starlette.types import Receive

_T = TypeVar("_T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client has closed the connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[_T], request: Request | None) -> _T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone
    finally:
        watcher.cancel()
        task.cancel()
