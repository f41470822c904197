"""A generation request as the attention node's scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from afd.sampling_params import SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for token `position` of a request seeded with `seed` (splitmix64 finaliser).

    Neighbouring (seed, position) pairs give unrelated streams, unlike seed + position.
    """
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass(slots=True)
class Request:
    """Prompt, output so far and progress through the KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache; reset to 0 when the request is preempted."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    """"stop", "length" or "abort" once finished."""
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    """Logprobs of prompt tokens 1.. (prompt_logprobs requests), filled as the prefill's chunks run; kept across a
    preemption, so recomputed chunks are not scored twice."""
    prompt_logprobs_sent: bool = False

    def next_token_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The generator for the next sampled token of a seeded request (None without a seed).

        Seeded from (seed, output position) rather than advanced from one per-request stream, so that a
        request migrated to another attention node with its output so far (resume tokens) samples exactly
        what it would have sampled where it started; the stream state never has to travel.
        """
        if self.params.seed is None:
            return None
        seed = position_seed(self.params.seed, len(self.output_token_ids))
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    """One per new token, for requests that asked for logprobs."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """In a request's first output, for requests that asked for prompt_logprobs: prompt tokens 1.. (the first
    prompt token has none)."""
