"""Batcher.compute_here: an idle FFN node computes a door's frame on the door's own thread; a busy one queues it
for the batch thread, which batches whatever queued meanwhile; never two computes at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from ffn_nodes.batching import Batcher

WAIT_S = 30.0


@dataclass
class _Placement:
    experts: list[list[int]] = field(default_factory=lambda: [[0, 1]])

    def index(self, node_id: str) -> int:
        return 0


@dataclass
class FakeShard:
    """Doubles the hidden states (a dense layer); records who computed what, and can hold a compute."""

    node_id: str = "ffn-0"
    dtype: torch.dtype = torch.float32
    placement: _Placement = field(default_factory=_Placement)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    threads: list[int] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    def compute(self, request: FfnRequest) -> torch.Tensor:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.threads.append(threading.get_ident())
        self.batch_rows.append(request.num_tokens)
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        self.running -= 1
        return request.hidden * 2


def _request(rows: int, value: float) -> FfnRequest:
    return FfnRequest(layer=0, hidden=torch.full((rows, 4), value), placement_version=1)


def _with_batcher(body: Callable[[Batcher, FakeShard, list[tuple[BaseException, str]]], None], **kw: Any) -> None:
    """Run `body` on a worker thread while a started Batcher serves (its event loop on this thread)."""
    shard = FakeShard()
    failures: list[tuple[BaseException, str]] = []
    held = kw.get("held", lambda: {1: shard})
    batcher = Batcher("ffn-0", 4096, held, lambda error, where: failures.append((error, where)))

    async def main() -> None:
        batcher.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(body, batcher, shard, failures), WAIT_S)
        finally:
            shard.gate.set()
            await batcher.stop()

    asyncio.run(main())


def test_an_idle_node_computes_on_the_callers_thread() -> None:
    def body(batcher: Batcher, shard: FakeShard, failures: list[Any]) -> None:
        reply = batcher.compute_here(_request(3, 1.5))
        assert reply.done()  # settled before compute_here returned
        torch.testing.assert_close(reply.result(), torch.full((3, 4), 3.0))
        assert shard.threads == [threading.get_ident()]
        assert batcher.counters.requests == 1 and batcher.counters.batches == 1

    _with_batcher(body)


def test_a_busy_node_queues_and_batches_what_arrives_meanwhile() -> None:
    # the first request computes inline on a door thread and is held there; two more arrive meanwhile
    def scenario(batcher: Batcher, shard: FakeShard, failures: list[Any]) -> None:
        shard.gate.clear()
        replies: dict[str, Any] = {}
        door = threading.Thread(target=lambda: replies.update(first=batcher.compute_here(_request(1, 1.0))))
        door.start()
        assert shard.entered.wait(WAIT_S)
        second = batcher.compute_here(_request(2, 2.0))
        third = batcher.submit_threadsafe(_request(3, 3.0))
        assert not second.done() and not third.done()  # queued: the node is busy, nothing computes them yet
        assert shard.batch_rows == [1]
        shard.gate.set()
        door.join(WAIT_S)
        torch.testing.assert_close(replies["first"].result(WAIT_S), torch.full((1, 4), 2.0))
        torch.testing.assert_close(second.result(WAIT_S), torch.full((2, 4), 4.0))
        torch.testing.assert_close(third.result(WAIT_S), torch.full((3, 4), 6.0))
        assert shard.batch_rows == [1, 5]  # the two that queued were computed as one batch
        assert shard.threads[0] == door.ident and shard.threads[1] != threading.get_ident()
        assert shard.most_at_once == 1
        assert not failures

    _with_batcher(scenario)


def test_a_door_never_computes_while_the_batch_thread_does() -> None:
    def scenario(batcher: Batcher, shard: FakeShard, failures: list[Any]) -> None:
        shard.gate.clear()
        queued = batcher.submit_threadsafe(_request(1, 1.0))  # the batch thread takes it and is held
        assert shard.entered.wait(WAIT_S)
        door = batcher.compute_here(_request(2, 1.0))
        assert not door.done()  # not computed beside the running batch
        shard.gate.set()
        torch.testing.assert_close(queued.result(WAIT_S), torch.full((1, 4), 2.0))
        torch.testing.assert_close(door.result(WAIT_S), torch.full((2, 4), 2.0))
        assert shard.most_at_once == 1
        assert threading.get_ident() not in shard.threads

    _with_batcher(scenario)


def test_a_refused_node_fails_a_door_request_at_once() -> None:
    def scenario(batcher: Batcher, shard: FakeShard, failures: list[Any]) -> None:
        batcher.refuse_all(PeerError("ffn-0", "the node failed and stops"))
        reply = batcher.compute_here(_request(1, 1.0))
        with pytest.raises(PeerError, match="the node failed and stops"):
            reply.result(0)
        assert shard.batch_rows == []

    _with_batcher(scenario)


def test_an_unexpected_error_in_an_inline_compute_stops_the_node_and_fails_the_request() -> None:
    def broken() -> dict[int, Any]:
        raise RuntimeError("shard table corrupt")

    def scenario(batcher: Batcher, shard: FakeShard, failures: list[Any]) -> None:
        reply = batcher.compute_here(_request(1, 1.0))
        with pytest.raises(PeerError, match="the node failed computing: RuntimeError: shard table corrupt"):
            reply.result(0)
        assert [where for _, where in failures] == ["an inline compute"]
        assert isinstance(batcher.failure, RuntimeError)
        assert not batcher.alive

    _with_batcher(scenario, held=broken)
