"""Generation of a request's choices on the backend, one generation request each, merged into one stream.

Each choice's tokens become text (stop strings cut it and abort the generation) and are recorded in the
router's latency and token metrics; the merged stream yields ChoiceEvents and cancels every choice's
generation if its consumer stops early.

A request that the engine ends on a stop token (EOS or stop_token_ids) keeps that token in its token ids
and logprobs but not in its text unless include_stop_str_in_output: vLLM's detokenizer
(v1/engine/detokenizer.py, `update(new_token_ids, stop_terminated)`) skips the last token's text when
stop-terminated, and appends its id all the same.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from afd.sampling_params import SamplingParams, TokenLogprobs
from afd.tokenizer import Tokenizer
from router.generation import GenerationBackend, GenerationFailed, GenerationRequest
from router.metrics import RouterMetrics
from router.text_stream import TextStream


@dataclass(slots=True)
class ChoiceEvent:
    """What one choice produced since its previous event."""

    index: int
    text: str
    """The text delta (held-back text of a possible stop string comes later)."""
    finish_reason: str | None
    """None while the choice runs."""
    completion_tokens: int
    """Tokens generated so far."""
    token_ids: list[int] = field(default_factory=list)
    """The new tokens (a stop token included)."""
    logprobs: list[TokenLogprobs] | None = None
    """One per new token, when logprobs were asked for."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Once, when prompt logprobs were asked for: prompt tokens 1.."""


class ChoiceGenerator:
    """Runs the choices of one OpenAI request on `backend`."""

    def __init__(
        self,
        backend: GenerationBackend,
        metrics: RouterMetrics,
        tokenizer: Tokenizer | None,
        include_stop: bool = False,
    ) -> None:
        """include_stop: include_stop_str_in_output (the matched stop string or stop token stays in the text)."""
        self.backend = backend
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.include_stop = include_stop

    async def _one(
        self, index: int, prompt_ids: list[int], params: SamplingParams, stops: list[str], events: asyncio.Queue
    ) -> None:
        """Generate one choice, putting its ChoiceEvents on `events`."""
        request_id = uuid.uuid4().hex
        request = GenerationRequest(request_id, prompt_ids, params)
        text = TextStream(self.tokenizer, stops, self.include_stop)
        start = last = time.monotonic()
        first = True
        generated = 0
        label = self.metrics.model_name
        try:
            async for event in self.backend.generate(request):
                now = time.monotonic()
                if event.token_ids:
                    if first:
                        self.metrics.ttft.labels(label).observe(now - start)
                        first = False
                    elif len(event.token_ids):
                        gap = (now - last) / len(event.token_ids)
                        for _ in event.token_ids:
                            self.metrics.itl.labels(label).observe(gap)
                    last = now
                    generated += len(event.token_ids)
                shown = event.token_ids
                if event.finished and event.finish_reason == "stop" and shown and not self.include_stop:
                    shown = shown[:-1]  # the stop token's text is left out (vLLM), its id and logprob stay
                delta = text.add(shown)
                finish = None
                if text.stopped:
                    await self.backend.abort(request_id)
                    finish = "stop"
                elif event.finished:
                    delta += text.finish()
                    finish = event.finish_reason or "stop"
                await events.put(
                    ChoiceEvent(
                        index, delta, finish, generated, list(event.token_ids), event.logprobs, event.prompt_logprobs
                    )
                )
                if finish is not None:
                    break
            else:
                raise GenerationFailed("the attention node ended the stream without finishing the request")
        except BaseException:
            await self.backend.abort(request_id)
            raise
        finally:
            self.metrics.e2e.labels(label).observe(time.monotonic() - start)
            self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))
            self.metrics.generation_tokens.labels(label).inc(generated)

    async def stream(
        self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]
    ) -> AsyncGenerator[ChoiceEvent, None]:
        """Merge the event streams of all choices; cancels them all if the consumer stops early."""
        events: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._one(i, ids, p, stops, events))
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        remaining = len(tasks)
        getter: asyncio.Future | None = None
        try:
            while remaining:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    [getter, *[t for t in tasks if not t.done()]], return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    for task in tasks:
                        if task.done() and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
                    continue
                item = getter.result()
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            if getter is not None:
                getter.cancel()  # cancelled while waiting: do not leave the queue read pending
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
