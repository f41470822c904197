"""Sampling parameters of one request, validated where the request enters (router or engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from afd.errors import RequestError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop, after vLLM's parameters of the same names."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Per-request random seed, for reproducible sampling."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Extra token ids that end the request (the output includes them)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
