"""What the HTTP layer needs from the cluster: start a generation, stream its tokens, abort it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from afd.errors import AfdError
from afd.sampling_params import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class TokenEvent:
    """New tokens of one request; the last event has `finished` set."""

    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    """"stop", "length" or "abort"."""
    logprobs: list[TokenLogprobs] | None = None
    """One per token of `token_ids`, when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Once, in the first event, when the request asked for prompt_logprobs: prompt tokens 1.."""


class Overloaded(AfdError):
    """Admission refused: the queue is full (HTTP 429)."""


class NoCapacity(AfdError):
    """No attention node can take the request (HTTP 503)."""


class GenerationFailed(AfdError):
    """The request was accepted but could not be finished (HTTP 500 / an error event in a stream)."""


class GenerationBackend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; raises Overloaded/NoCapacity before the first event."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request (client went away or a stop string matched); idempotent."""
        ...
