"""M2N batching on an FFN node: requests from every attention node, computed together.

Requests from every door (gRPC streams on the event loop, pairwise channels on their receive threads) go
into one inbox; the batch thread takes whatever has arrived, concatenates requests of the same layer into one
`FfnShard.compute`, and settles each request's future. While it computes, the doors keep receiving, so the
next batch is as large as the load makes it - no timer, no added latency when idle.

Why a thread of its own rather than a task on the event loop that hands each batch to an executor: a frame
from a channel would cross four threads (receive thread -> loop -> compute thread -> loop -> send thread),
and on a busy host each handoff waits for a core and the GIL. The channel doors submit from their receive
thread and the send thread waits on the future the batch thread settles: two handoffs. The event loop
submits through `submit`, which also keeps what one loop iteration submitted together in one batch. On an idle
node a channel door computes its frame itself (`compute_here`): no handoff at all, and still one compute at a
time, with what arrives meanwhile batched by the batch thread as before.

The batcher also keeps the node's load counters: the batch thread adds to them and the heartbeat takes
(and resets) them under one lock, so an add lands either in the period taken or in the next one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
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
    """Seconds the batch thread spent computing."""
    requests: int = 0
    """Requests computed."""
    batches: int = 0
    """Compute calls (M2N batches)."""
    tokens: int = 0
    """Token rows computed."""


@dataclass(slots=True)
class _Work:
    request: FfnRequest
    reply: concurrent.futures.Future[torch.Tensor]


HeldShards = Callable[[], dict[int, FfnShard]]
"""Placement version -> shard, for every placement whose requests the node still computes."""
OnFailure = Callable[[BaseException, str], None]
"""Called when the batch loop fails unexpectedly (the node stops: FfnNodeServer.fail)."""


def _settle(reply: concurrent.futures.Future[torch.Tensor], outcome: torch.Tensor | BaseException) -> None:
    """Resolve `reply` unless it already is (refused meanwhile, or cancelled by its waiter)."""
    try:
        if isinstance(outcome, BaseException):
            reply.set_exception(outcome)
        else:
            reply.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass


class Batcher:
    """The inbox, the batch thread, and the load counters."""

    def __init__(self, node_id: str, max_batch_tokens: int, held_shards: HeldShards, on_failure: OnFailure) -> None:
        self.node_id = node_id
        self.max_batch_tokens = max_batch_tokens
        self.held_shards = held_shards
        self.on_failure = on_failure
        self.counters = LoadCounters()
        self.token_rows_total = 0
        """Token rows computed since start (monotonic; the router derives the FFN tokens/s from it)."""
        self.failure: BaseException | None = None
        """What ended the batch thread unexpectedly (then `on_failure` was called); None while it serves."""
        self._lock = threading.Lock()
        """Guards `counters`, `token_rows_total` and `_expert_baselines` (batch thread vs event loop)."""
        self._expert_baselines: dict[int, list[int]] = {}
        """Placement version -> its shard's FfnShard.expert_token_counts() at the start of the load period."""
        self._retired_pairs: collections.Counter[int] = collections.Counter()
        """Global expert -> pairs computed in this load period by shards no longer held (`retire`)."""
        self._inbox: collections.deque[_Work] = collections.deque()
        self._arrived = threading.Condition(threading.Lock())
        """Guards `_inbox`, `_pending`, `_refusal` and `_stopping`; notified when work arrives or on stop."""
        self._pending: set[concurrent.futures.Future[torch.Tensor]] = set()
        self._refusal: BaseException | None = None
        self._stopping = False
        self._busy = False
        """A batch is being computed (on the batch thread, or inline on a door's thread by `compute_here`)."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._this_tick: list[_Work] = []
        """Work the event loop submitted in its current iteration, handed over together at its end."""

    @property
    def alive(self) -> bool:
        """The batch thread runs (started, not stopped, not failed)."""
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        """Start the batch thread; `submit` then needs the running event loop it is called from."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"ffn-compute-{self.node_id}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the batch thread after its current batch; whatever still waits fails with PeerError."""
        with self._arrived:
            self._stopping = True
            self._arrived.notify_all()
        self.refuse_all(PeerError(self.node_id, "the node is stopping"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    def submit(self, request: FfnRequest) -> asyncio.Future[torch.Tensor]:
        """Queue `request` for a coming batch (event loop thread only); fails at once once refused.

        Everything the loop submits in one iteration reaches the batch thread at once, so requests that
        arrived together are computed together."""
        assert self._loop is not None, "submit() before start()"
        reply: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        if not self._this_tick:
            self._loop.call_soon(self._hand_over_tick)
        self._this_tick.append(_Work(request, reply))
        return asyncio.wrap_future(reply, loop=self._loop)

    def submit_threadsafe(self, request: FfnRequest) -> concurrent.futures.Future[torch.Tensor]:
        """Queue `request` for the next batch from any thread (the channel doors); fails at once once refused."""
        reply: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        self._hand_over([_Work(request, reply)])
        return reply

    def compute_here(self, request: FfnRequest) -> concurrent.futures.Future[torch.Tensor]:
        """`submit_threadsafe`, except that on an idle node `request` is computed on the calling thread before
        this returns (the future is then settled).

        Why: with one attention node (and at every layer of every step) a channel's frame then crosses no
        thread between its arrival and its reply, where handing it to the batch thread and back cost two
        wake-ups on a busy host. Batching is unchanged: a request is computed alone exactly when nothing else
        is waiting or computing, and whatever arrives meanwhile queues for the batch thread, which takes it
        all as one batch once this compute is done."""
        work = _Work(request, concurrent.futures.Future())
        with self._arrived:
            inline = self._refusal is None and not self._stopping and not self._busy and not self._inbox
            if inline:
                self._busy = True
                self._pending.add(work.reply)
        if not inline:
            return self.submit_threadsafe(request)
        work.reply.set_running_or_notify_cancel()
        try:
            self._compute([work])
        except Exception as exc:  # as in the batch loop: fatal for the node, never a reply left pending
            self.failure = exc
            _settle(work.reply, PeerError(self.node_id, f"the node failed computing: {type(exc).__name__}: {exc}"))
            self.on_failure(exc, "an inline compute")
        finally:
            self._idle()
        return work.reply

    def _idle(self) -> None:
        """The current batch is done: the batch thread may take what queued meanwhile."""
        with self._arrived:
            self._busy = False
            if self._inbox:
                self._arrived.notify()

    def _hand_over_tick(self) -> None:
        works, self._this_tick = self._this_tick, []
        self._hand_over(works)

    def _hand_over(self, works: list[_Work]) -> None:
        with self._arrived:
            refusal = self._refusal
            if refusal is None:
                self._inbox.extend(works)
                self._pending.update(work.reply for work in works)
                self._arrived.notify()
        if refusal is not None:
            for work in works:
                _settle(work.reply, refusal)

    def refuse_all(self, reason: BaseException) -> None:
        """Fail every pending reply with `reason`, and every later submit (the node stops; any thread)."""
        with self._arrived:
            self._refusal = reason
            pending, self._pending = self._pending, set()
            self._inbox.clear()
        for reply in pending:
            _settle(reply, reason)

    def _run(self) -> None:
        """The node's core: an unexpected exception here is fatal (`on_failure`), never a silently dead thread."""
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    self._compute(batch)
                finally:
                    self._idle()
        except Exception as exc:
            self.failure = exc
            self.on_failure(exc, "the batch loop")

    def _next_batch(self) -> list[_Work] | None:
        """Whatever has arrived, up to max_batch_tokens (at least one request), once no other batch computes;
        None once stopping."""
        with self._arrived:
            while (not self._inbox or self._busy) and not self._stopping:
                self._arrived.wait()
            if self._stopping:
                return None
            self._busy = True
            batch: list[_Work] = []
            tokens = 0
            while self._inbox and (not batch or tokens < self.max_batch_tokens):
                work = self._inbox.popleft()
                if work.reply.set_running_or_notify_cancel():  # False: its waiter gave up already
                    batch.append(work)
                    tokens += work.request.num_tokens
                else:
                    self._pending.discard(work.reply)
            return batch

    def _compute(self, batch: list[_Work]) -> None:
        if not batch:
            return
        shards = self.held_shards()
        outcomes: list[torch.Tensor | Exception]
        if shards:
            outcomes = self._timed_compute(shards, batch)
        else:
            outcomes = [PeerError(self.node_id, "no experts loaded yet")] * len(batch)
        with self._arrived:
            self._pending.difference_update(work.reply for work in batch)
        for work, outcome in zip(batch, outcomes, strict=True):
            _settle(work.reply, outcome)

    def _timed_compute(self, shards: dict[int, FfnShard], batch: list[_Work]) -> list[torch.Tensor | Exception]:
        """Compute `batch` (batch thread). Per-expert counts are taken by the shards' experts as they compute."""
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

    def retire(self, shard: FfnShard) -> None:
        """`shard` stops being held (a third placement arrived while it was the previous one): what it computed
        since its last reading is kept and reported with the next load, like the previous shard's pairs. Two
        placement changes between heartbeats (replication re-plans every few seconds under load) lost them."""
        with self._lock:
            now = shard.expert_token_counts()
            before = self._expert_baselines.pop(shard.placement.version, [0] * len(now))
            ids = shard.placement.experts[shard.placement.index(shard.node_id)]
            for expert, count, prior in zip(ids, now, before, strict=True):
                if count != prior:
                    self._retired_pairs[expert] += count - prior

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
                for expert, count in self._retired_pairs.items():
                    if expert in local_of:
                        experts[local_of[expert]] += count
                if reset:
                    self._expert_baselines = readings
                    self._retired_pairs.clear()
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
