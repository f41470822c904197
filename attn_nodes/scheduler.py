"""Continuous batching: which requests run this step, and how many of their tokens.

Every request needs `num_tokens - num_computed_tokens` tokens computed (the whole prompt at first, one
token per decode step, everything again after a preemption). Running requests go first; when the KV
cache cannot grow, the most recently admitted request is preempted (its blocks freed, its tokens
recomputed later), so a request is delayed, never corrupted. Waiting requests are admitted while the
token budget, the sequence limit and the cache allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from attn_nodes.config import EngineConfig
from attn_nodes.kv_cache import KVCacheManager
from attn_nodes.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples a new one."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + count):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledChunk(request, count))
                budget -= count
                index += 1
        # After a preemption the cache is full: admitting new work would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            remaining = request.num_tokens - request.num_computed_tokens
            count = min(remaining, budget)
            if count < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.kv.allocate(request.request_id, request.num_computed_tokens + count):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledChunk(request, count))
            budget -= count
        return scheduled

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request from the batch and return its blocks."""
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)
