"""Sampling parameters of one request, validated where the request enters (router or engine)."""

from __future__ import annotations

import math
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
    """Extra token ids that end the request (the output token ids include them; the text leaves them out
    unless include_stop_str_in_output)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of the `logprobs` most likely ones (0..20);
    None returns none. Raw: log-softmax of the model's logits, before penalties, bias and temperature
    (vLLM's default logprobs_mode, raw_logprobs)."""
    prompt_logprobs: int | None = None
    """Like `logprobs`, for every prompt token after the first (completions' `echo` with `logprobs`)."""
    presence_penalty: float = 0.0
    """OpenAI: subtract this from the logit of every token already in the output (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract this times the token's count in the output so far (-2..2)."""
    repetition_penalty: float = 1.0
    """vLLM / HF: divide positive (multiply negative) logits of tokens in the prompt or output by it (> 0)."""
    min_tokens: int = 0
    """End-of-sequence and stop_token_ids cannot be sampled before this many output tokens."""
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    """(token id, bias -100..100) pairs added to the logits before sampling (a tuple: the params are frozen)."""

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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                raise RequestError(f"{name} must be an integer in 0..20, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty < math.inf:  # NaN fails too
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise RequestError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        for token, value in bias:
            if token < 0:
                raise RequestError(f"logit_bias token id {token} is negative")
            if not -100.0 <= value <= 100.0:
                raise RequestError(f"logit_bias of token {token} must be in [-100, 100], got {value}")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """True when the logits need processing before sampling (penalties, min_tokens or logit_bias)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.logit_bias
        )


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Raw log-probabilities at one position: of the token there and of the most likely tokens."""

    token_id: int
    logprob: float
    """log-softmax of the model's logits at `token_id` (before penalties, bias and temperature)."""
    rank: int
    """1 + the number of tokens more likely than `token_id`."""
    top: tuple[tuple[int, float], ...] = ()
    """The k most likely (token id, logprob), most likely first (k = the request's logprobs)."""
