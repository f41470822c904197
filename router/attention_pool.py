"""Generation on the attention nodes: admission, node choice, token streaming and migration on failure.

The router streams each request's tokens from the attention node it placed the request on (gRPC
server-streaming Generate). If that node dies or drains mid-request, the request moves to another
attention node with the tokens already streamed, which re-prefills prompt + those tokens and continues:
the client's stream goes on without a duplicated or missing token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.sampling_proto import logprobs_from_proto, sampling_to_proto
from router.controller import Controller
from router.generation import GenerationFailed, GenerationRequest, NoCapacity, Overloaded, TokenEvent
from router.membership import NodeRecord

log = logging.getLogger("afd.router")

# Errors that mean "this node cannot finish the request", as opposed to a bad request.
_MIGRATE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """How many requests wait for and run on the attention nodes, and how often one may move between them."""

    max_waiting: int = 256
    """Requests allowed to wait for an attention node before new ones get 429."""
    max_inflight_per_node: int = 512
    """Streams per attention node before requests queue at the router."""
    capacity_timeout_s: float = 60.0
    """How long a request waits for an attention node (and a placement) before a 503."""
    max_migrations: int = 3
    """Attempts on other attention nodes after failures."""


class AttentionPoolBackend:
    """The GenerationBackend of the cluster: each request runs on one attention node, and moves on failure."""

    def __init__(self, controller: Controller, config: AdmissionConfig) -> None:
        self.controller = controller
        self.config = config
        self._waiting = 0
        self._slot_freed = asyncio.Condition()
        self._running: dict[str, tuple[NodeRecord, grpc.aio.UnaryStreamCall]] = {}

    @property
    def num_waiting(self) -> int:
        return self._waiting

    async def _acquire_node(self, exclude: set[str]) -> NodeRecord:
        if self._waiting >= self.config.max_waiting:
            raise Overloaded(f"the router queue is full ({self._waiting} requests waiting); retry later")
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.capacity_timeout_s
            while True:
                node = self.controller.pick_attention_node(exclude)
                if node is not None and node.inflight < self.config.max_inflight_per_node:
                    node.inflight += 1
                    return node
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoCapacity(
                        f"no attention node could take the request within {self.config.capacity_timeout_s:.0f} s"
                        + ("" if self.controller.placement else " (no FFN node holds the experts yet)")
                    )
                async with self._slot_freed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), min(remaining, 0.25))
        finally:
            self._waiting -= 1

    async def _release(self, node: NodeRecord) -> None:
        node.inflight -= 1
        async with self._slot_freed:
            self._slot_freed.notify()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        produced: list[int] = []
        failed_nodes: set[str] = set()
        prompt_logprobs_seen = False
        params = request.params
        attempt = 0
        while True:
            node = await self._acquire_node(failed_nodes)
            message = pb.GenerateRequest(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                params=sampling_to_proto(params),
                resume_output_token_ids=produced,
            )
            call = self.controller.attention_stub(node).Generate(message)
            self._running[request.request_id] = (node, call)
            try:
                async for chunk in call:
                    if chunk.token_ids:
                        produced.extend(chunk.token_ids)
                    event = TokenEvent(list(chunk.token_ids), chunk.finished, chunk.finish_reason or None)
                    if chunk.logprobs:
                        event.logprobs = logprobs_from_proto(chunk.logprobs)
                    if chunk.prompt_logprobs and not prompt_logprobs_seen:
                        # After a migration the new node scores the prompt again; the client has it already.
                        prompt_logprobs_seen = True
                        event.prompt_logprobs = logprobs_from_proto(chunk.prompt_logprobs)
                    yield event
                    if chunk.finished:
                        return
                error = "the attention node closed the stream early"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _MIGRATE_CODES:
                    raise GenerationFailed(f"attention node {node.node_id}: {exc.details()}") from exc
                if self._running.get(request.request_id, (None, None))[1] is not call:
                    return  # aborted by us
                error = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # Unreachable: stop placing requests there (a live node re-registers on its next heartbeat).
                    await self.controller.declare_dead(node.node_id, error)
            finally:
                self._running.pop(request.request_id, None)
                await self._release(node)
            attempt += 1
            failed_nodes.add(node.node_id)
            self.controller.metrics.requests_migrated.labels(self.controller.metrics.model_name).inc()
            log.warning(
                "request %s lost attention node %s (%s); migrating with %d tokens (attempt %d)",
                request.request_id,
                node.node_id,
                error,
                len(produced),
                attempt,
            )
            if attempt > self.config.max_migrations:
                raise GenerationFailed(f"request failed on {attempt} attention nodes; last error: {error}")

    async def abort(self, request_id: str) -> None:
        entry = self._running.pop(request_id, None)
        if entry is None:
            return
        _, call = entry
        call.cancel()  # the attention node sees the stream cancelled and frees the request
