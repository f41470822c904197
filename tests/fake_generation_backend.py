"""A GenerationBackend without a cluster, for tests of the router's HTTP layer.

Generates prompt[-1]+1, +2, ... (mod vocab), `per_event` tokens per event, optionally `delay_s` apart, and
attaches made-up logprobs (token t: -t / vocab, its top-k t, t+1, ...) when the request asks for them, and
keeps the bookkeeping the real backend's nodes report: requests running now (also exported as
`vllm:num_requests_running`, as the controller does from heartbeats), aborts seen, the peak.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from afd.sampling_params import TokenLogprobs
from router.generation import GenerationRequest, Overloaded, TokenEvent
from router.metrics import RouterMetrics


class FakeBackend:
    def __init__(self, vocab: int, metrics: RouterMetrics | None = None, delay_s: float = 0.0, per_event: int = 2):
        self.vocab = vocab
        self.metrics = metrics
        self.delay_s = delay_s
        self.per_event = per_event
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[GenerationRequest] = []
        self.overloaded = False
        self.fail_with: BaseException | None = None
        """Raised on the first event (a bug inside the backend)."""
        self.changed = asyncio.Event()
        """Set whenever `running` changes (for waits with a deadline instead of sleeps)."""

    def _update(self) -> None:
        if self.metrics is not None:
            self.metrics.num_requests_running.labels(self.metrics.model_name).set(len(self.running))
        self.changed.set()

    def logprob(self, token: int, k: int) -> TokenLogprobs:
        """The made-up logprobs of `token`: -token / vocab, rank 1, top-k token, token + 1, ..."""
        top = tuple(((token + i) % self.vocab, -((token + i) % self.vocab) / self.vocab) for i in range(k))
        return TokenLogprobs(token, -token / self.vocab, 1, top)

    def _event(self, request: GenerationRequest, batch: list[int], first: bool, *args) -> TokenEvent:
        event = TokenEvent(batch, *args)
        params = request.params
        if params.logprobs is not None:
            event.logprobs = [self.logprob(t, params.logprobs) for t in batch]
        if first and params.prompt_logprobs is not None:
            event.prompt_logprobs = [self.logprob(t, params.prompt_logprobs) for t in request.prompt_token_ids[1:]]
        return event

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.overloaded:
            raise Overloaded("the router queue is full (2 waiting)")
        if self.fail_with is not None:
            raise self.fail_with
        self.seen.append(request)
        self.running.add(request.request_id)
        self._update()
        try:
            produced, token = 0, request.prompt_token_ids[-1]
            while True:
                batch = []
                for _ in range(self.per_event):
                    token = (token + 1) % self.vocab
                    batch.append(token)
                    produced += 1
                    if token in request.params.stop_token_ids:
                        yield self._event(request, batch, produced <= self.per_event, True, "stop")
                        return
                    if produced >= request.params.max_tokens:
                        yield self._event(request, batch, produced <= self.per_event, True, "length")
                        return
                yield self._event(request, batch, produced <= self.per_event)
                await asyncio.sleep(self.delay_s)
        finally:
            self.running.discard(request.request_id)
            self._update()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def wait_idle(self, timeout: float) -> None:
        """Until no request is running; raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while self.running:
                self.changed.clear()
                await self.changed.wait()
