"""Generation of a request's choices on the backend, one generation request each, merged into one stream.

Each choice's tokens become text (stop strings cut it and abort the generation) and are recorded in the
router's latency and token metrics; the merged stream yields (choice index, text delta, finish reason or
None, tokens generated so far) and cancels every choice's generation if its consumer stops early.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator

from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from router.generation import GenerationBackend, GenerationFailed, GenerationRequest
from router.metrics import RouterMetrics
from router.text_stream import TextStream

ChoiceEvent = tuple[int, str, str | None, int]
"""(choice index, text delta, finish reason or None while running, completion tokens so far)."""


class ChoiceGenerator:
    """Runs the choices of one OpenAI request on `backend`."""

    def __init__(self, backend: GenerationBackend, metrics: RouterMetrics, tokenizer: Tokenizer | None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.tokenizer = tokenizer

    async def _one(
        self, index: int, prompt_ids: list[int], params: SamplingParams, stops: list[str], events: asyncio.Queue
    ) -> None:
        """Generate one choice, putting (index, text delta, finish_reason) on `events`."""
        request_id = uuid.uuid4().hex
        request = GenerationRequest(request_id, prompt_ids, params)
        text = TextStream(self.tokenizer, stops)
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
                delta = text.add(event.token_ids)
                if text.stopped:
                    await self.backend.abort(request_id)
                    await events.put((index, delta, "stop", generated))
                    break
                if event.finished:
                    delta += text.finish()
                    await events.put((index, delta, event.finish_reason or "stop", generated))
                    break
                await events.put((index, delta, None, generated))
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
                if item[2] is not None:
                    remaining -= 1
                yield item
        finally:
            if getter is not None:
                getter.cancel()  # cancelled while waiting: do not leave the queue read pending
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
