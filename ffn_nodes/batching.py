"""M2N batching on an FFN node: requests from every attention node, computed together.

Frames from every attention node (and every channel) go into one queue; the batch loop takes whatever has
arrived, concatenates requests of the same layer into one `FfnShard.compute` on the compute thread, and
splits the result back. While the thread computes, the event loop keeps receiving, so the next batch is as
large as the load makes it - no timer, no added latency when idle.

The batcher also keeps the node's load counters: the compute thread adds to them and the heartbeat takes
(and resets) them under one lock, so an add lands either in the period taken or in the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from afd.errors import AfdError, PeerError
from afd.ffn_messages import FfnRequest
from afd.wire.frames import OutOfRange
from afd.wire.generated import afd_cluster_pb2 as pb
from ffn_nodes.shard import FfnShard

log = logging.getLogger("ffn_nodes.server")


class StalePlacementError(AfdError, ValueError):
    """A request refers to a placement version this node does not hold (any more, or yet)."""


@dataclass(slots=True)
class LoadCounters:
    """What the node did since the counters were last taken (for heartbeats and Status).

    Per-expert counts are not here: each shard counts its own (FfnShard.expert_token_counts).
    """

    started: float = field(default_factory=time.monotonic)
    """When this period began (monotonic clock)."""
    busy_s: float = 0.0
    """Seconds the compute thread spent computing."""
    requests: int = 0
    """Requests computed."""
    batches: int = 0
    """Compute calls (M2N batches)."""
    tokens: int = 0
    """Token rows computed."""


@dataclass(slots=True)
class _Work:
    request: FfnRequest
    reply: asyncio.Future[torch.Tensor]


HeldShards = Callable[[], dict[int, FfnShard]]
"""Placement version -> shard, for every placement whose requests the node still computes."""
OnFailure = Callable[[BaseException, str], None]
"""Called when the batch loop fails unexpectedly (the node stops: FfnNodeServer.fail)."""


class Batcher:
    """The queue, the batch loop on the event loop, the compute thread, and the load counters."""

    def __init__(self, node_id: str, max_batch_tokens: int, held_shards: HeldShards, on_failure: OnFailure) -> None:
        self.node_id = node_id
        self.max_batch_tokens = max_batch_tokens
        self.held_shards = held_shards
        self.on_failure = on_failure
        self.counters = LoadCounters()
        self.token_rows_total = 0
        """Token rows computed since start (monotonic; the router derives the FFN tokens/s from it)."""
        self.task: asyncio.Task[None] | None = None
        """The batch loop; ends only when stopped or when it failed (then `on_failure` was called)."""
        self._lock = threading.Lock()
        """Guards `counters`, `token_rows_total` and `_expert_baselines` (compute thread vs event loop)."""
        self._expert_baselines: dict[int, list[int]] = {}
        """Placement version -> its shard's FfnShard.expert_token_counts() at the start of the load period."""
        self._pending: set[asyncio.Future[torch.Tensor]] = set()
        self._refusal: Exception | None = None
        self._queue: asyncio.Queue[_Work] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compute: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the batch loop on the running event loop and the compute thread."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ffn-compute-{self.node_id}")
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping: its outcome no longer matters
                await self.task
        if self._compute is not None:
            self._compute.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: FfnRequest) -> asyncio.Future[torch.Tensor]:
        """Queue `request` for the next batch (event loop thread only); fails at once once refused."""
        assert self._loop is not None and self._queue is not None, "submit() before start()"
        reply: asyncio.Future[torch.Tensor] = self._loop.create_future()
        if self._refusal is not None:
            reply.set_exception(self._refusal)
            return reply
        self._pending.add(reply)
        reply.add_done_callback(self._pending.discard)
        self._queue.put_nowait(_Work(request, reply))
        return reply

    def refuse_all(self, reason: Exception) -> None:
        """Fail every pending reply with `reason`, and every later submit (the node stops; event loop only)."""
        self._refusal = reason
        for reply in list(self._pending):
            if not reply.done():
                reply.set_exception(reason)
        self._pending.clear()

    async def _run(self) -> None:
        """The node's core: an unexpected exception here is fatal (`on_failure`), never a silently dead task."""
        try:
            await self._batch_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_failure(exc, "the batch loop")

    async def _batch_forever(self) -> None:
        assert self._queue is not None and self._loop is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            tokens = first.request.num_tokens
            while not self._queue.empty() and tokens < self.max_batch_tokens:
                work = self._queue.get_nowait()
                batch.append(work)
                tokens += work.request.num_tokens
            shards = self.held_shards()
            if not shards:
                for work in batch:
                    if not work.reply.done():
                        work.reply.set_exception(PeerError(self.node_id, "no experts loaded yet"))
                continue
            results = await self._loop.run_in_executor(self._compute, self._timed_compute, shards, batch)
            for work, result in zip(batch, results, strict=True):
                if work.reply.done():
                    continue
                if isinstance(result, Exception):
                    work.reply.set_exception(result)
                else:
                    work.reply.set_result(result)

    def _timed_compute(self, shards: dict[int, FfnShard], batch: list[_Work]) -> list[torch.Tensor | Exception]:
        """Compute `batch` (compute thread). Per-expert counts are taken by the shards' experts as they compute."""
        start = time.perf_counter()
        requests = [work.request for work in batch]
        results = compute_batch(shards, requests)
        elapsed = time.perf_counter() - start
        rows = sum(r.num_tokens for r in requests)
        with self._lock:  # take_load may be swapping the counters right now
            counters = self.counters
            counters.busy_s += elapsed
            counters.batches += 1
            counters.requests += len(requests)
            counters.tokens += rows
            self.token_rows_total += rows
        return results

    # -- load ----------------------------------------------------------------------------------

    def count_experts_from(self, shard: FfnShard) -> None:
        """`shard` became the current one: its expert counts are reported from its reading now."""
        with self._lock:
            self._expert_baselines[shard.placement.version] = shard.expert_token_counts()

    def take_load(self, shard: FfnShard | None, reset: bool = False) -> pb.NodeLoad:
        """The load since the counters were last reset: busy fraction, and token-expert pairs per local
        expert of `shard` (the current one). With `reset` a new period starts, atomically with the compute
        thread.

        The pairs of the previous shard (frames still addressed under the old placement while a change
        propagates, and what it computed since the last report before it was replaced) are reported too,
        under the current shard's local id of the same global expert: placement changes are frequent with
        hot-expert replication, and the router's load window would otherwise lose the load of every switch.
        Only pairs of an expert the current shard no longer holds are dropped (the heartbeat has no place
        for them)."""
        experts: list[int] = []
        with self._lock:
            counters = self.counters
            rows = self.token_rows_total
            if reset:
                self.counters = LoadCounters()
            if shard is not None:
                held = self.held_shards()
                held[shard.placement.version] = shard
                mine = shard.placement.experts[shard.placement.index(shard.node_id)]
                local_of = {expert: local for local, expert in enumerate(mine)}
                experts = [0] * len(mine)
                readings: dict[int, list[int]] = {}
                for version, source in held.items():
                    now = readings[version] = source.expert_token_counts()
                    before = self._expert_baselines.get(version, [0] * len(now))
                    ids = source.placement.experts[source.placement.index(source.node_id)]
                    for expert, count, prior in zip(ids, now, before, strict=True):
                        if count != prior and expert in local_of:
                            experts[local_of[expert]] += count - prior
                if reset:
                    self._expert_baselines = readings
        elapsed = max(time.monotonic() - counters.started, 1e-9)
        layers = shard.spec.num_layers if shard is not None else 1
        return pb.NodeLoad(
            busy_fraction=min(1.0, counters.busy_s / elapsed),
            expert_token_counts=experts,
            generated_tokens=rows // layers,  # tokens whose whole FFN stack ran here
        )


# ---------------------------------------------------------------------------------------------------
# One batch: group by (placement version, layer, kind), compute each group once
# ---------------------------------------------------------------------------------------------------


def _batch_key(request: FfnRequest) -> tuple[Any, ...]:
    return (request.placement_version, request.layer, request.expert_ids is None, request.hidden.dtype)


def compute_batch(shards: Mapping[int, FfnShard], requests: list[FfnRequest]) -> list[torch.Tensor | Exception]:
    """Partial sums for `requests`, computing those of the same layer as one concatenated batch.

    shards: placement version -> shard; each request is computed by the shard of its placement_version.
    A request that fails (unknown version, ids out of its shard's range) gets its exception; the rest
    of the batch is computed regardless.
    """
    results: list[torch.Tensor | Exception] = [RuntimeError("not computed")] * len(requests)
    groups: dict[tuple[Any, ...], list[int]] = {}
    requests = list(requests)
    for index, request in enumerate(requests):
        try:
            shard = _shard_for(shards, request.placement_version)
            _check_local_ids(shard, request)
        except AfdError as exc:
            results[index] = exc
            continue
        requests[index] = request.in_dtype(shard.dtype)  # an fp8 (or bf16) wire: back to the model dtype
        groups.setdefault(_batch_key(requests[index]), []).append(index)
    for indices in groups.values():
        members = [requests[i] for i in indices]
        try:
            partials = _compute_group(shards[members[0].placement_version], members)
        except Exception as exc:  # one bad group must not take the others down
            log.exception("compute failed for layer %d", members[0].layer)
            partials = [exc] * len(members)
        for index, partial in zip(indices, partials, strict=True):
            results[index] = partial
    return results


def _shard_for(shards: Mapping[int, FfnShard], version: int) -> FfnShard:
    shard = shards.get(version)
    if shard is None:
        raise StalePlacementError(f"placement version {version} is not loaded here (holding {sorted(shards)})")
    return shard


def _check_local_ids(shard: FfnShard, request: FfnRequest) -> None:
    """The frame decoder checked ids against the largest shard held; this is the one they address."""
    local = len(shard.placement.experts[shard.placement.index(shard.node_id)])
    ids = request.expert_ids
    if ids is not None and ids.numel() and int(ids.max()) >= local:
        raise OutOfRange(
            f"local expert id {int(ids.max())} >= {local} experts of placement version {shard.placement.version}"
        )


def _compute_group(shard: FfnShard, members: list[FfnRequest]) -> list[torch.Tensor | Exception]:
    if len(members) == 1:
        return [shard.compute(members[0])]
    first = members[0]
    with_ids = first.expert_ids is not None
    with_scale = any(m.shared_scale is not None for m in members)
    merged = FfnRequest(
        layer=first.layer,
        hidden=torch.cat([m.hidden for m in members]),
        expert_ids=torch.cat([m.expert_ids for m in members if m.expert_ids is not None]) if with_ids else None,
        expert_weights=(
            torch.cat([m.expert_weights for m in members if m.expert_weights is not None]) if with_ids else None
        ),
        # a request without a shared-expert scale means scale 1 (what FfnShard.compute does with None)
        shared_scale=(
            torch.cat([m.shared_scale if m.shared_scale is not None else torch.ones(m.num_tokens) for m in members])
            if with_scale
            else None
        ),
        microbatch=first.microbatch,
        placement_version=first.placement_version,
    )
    partial = shard.compute(merged)
    return list(torch.split(partial, [m.num_tokens for m in members]))
