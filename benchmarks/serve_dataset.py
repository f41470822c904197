"""The workload of `afd bench serve`: random prompts of chosen lengths and when each request is sent.

Prompts are random, like vLLM's `random` dataset, so a run needs no dataset download and no client-side
tokenizer: the completions endpoint gets token-id prompts (a list of ints, which vLLM and the AFD router
accept), so every prompt has exactly the planned length; the chat endpoint needs text, so it gets random
words from the built-in model's vocabulary (one token per word there, roughly one on real tokenizers).

Arrivals follow a gamma process like vLLM's `--request-rate/--burstiness`: burstiness 1 is Poisson, lower
is burstier, higher is more even. Everything is drawn from generators seeded by `seed`, so two runs with the
same arguments send the same prompts on the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from afd.errors import ConfigError

# Separate streams, so changing the arrival process never changes the prompts and vice versa.
_PROMPT_STREAM = 0
_ARRIVAL_STREAM = 1


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One benchmark request before it is sent."""

    prompt: list[int] | str
    """Token ids (completions endpoint) or text (chat endpoint)."""
    prompt_len: int
    """Planned prompt length in tokens; the server's usage count replaces it when the server reports one."""
    expected_output_len: int
    """max_tokens of the request; with ignore_eos the server generates exactly this many tokens."""


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, count: int) -> np.ndarray:
    """`count` lengths uniform in [mean·(1-r), mean·(1+r)], at least 1 (r = 0: all equal to `mean`)."""
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=count)


def check_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float) -> None:
    """Raise ConfigError unless the counts and lengths make a workload."""
    if num_prompts < 1:
        raise ConfigError(f"num_prompts must be >= 1, got {num_prompts}")
    if input_len < 1 or output_len < 1:
        raise ConfigError(f"random input/output lengths must be >= 1, got {input_len}/{output_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise ConfigError(f"random_range_ratio must be in [0, 1), got {range_ratio}")


def random_token_requests(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[SampleRequest]:
    """Token-id prompts with ids uniform in [0, vocab_size), for the completions endpoint."""
    check_workload(num_prompts, input_len, output_len, range_ratio)
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = _rng(seed, _PROMPT_STREAM)
    input_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    return [
        SampleRequest(rng.integers(0, vocab_size, size=int(n)).tolist(), int(n), int(m))
        for n, m in zip(input_lens, output_lens, strict=True)
    ]


@cache
def _words() -> tuple[str, ...]:
    text = resources.files("afd").joinpath("builtin_words.txt").read_text()
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def random_word_requests(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[SampleRequest]:
    """Text prompts of `input_len` random words (same lengths as `random_token_requests`), for chat."""
    check_workload(num_prompts, input_len, output_len, range_ratio)
    words = _words()
    rng = _rng(seed, _PROMPT_STREAM)
    input_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    return [
        SampleRequest(" ".join(words[i] for i in rng.integers(0, len(words), size=int(n))), int(n), int(m))
        for n, m in zip(input_lens, output_lens, strict=True)
    ]


def check_arrivals(request_rate: float, burstiness: float) -> None:
    """Raise ConfigError unless rate and burstiness are positive (inf allowed)."""
    if not request_rate > 0:  # also rejects NaN
        raise ConfigError(f"request_rate must be > 0 (inf = all at once), got {request_rate}")
    if not burstiness > 0:
        raise ConfigError(f"burstiness must be > 0, got {burstiness}")


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send time of each request in seconds after the start, non-decreasing.

    request_rate inf: all at 0. Otherwise gaps are gamma(shape=burstiness, mean=1/request_rate), then
    scaled so the last request goes out at num_requests / request_rate: the realised mean rate is the
    configured one for every seed, which keeps throughput comparable between seeds.
    """
    check_arrivals(request_rate, burstiness)
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        gaps = _rng(seed, _ARRIVAL_STREAM).gamma(
            shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests
        )
    offsets = np.cumsum(gaps)
    offsets *= (num_requests / request_rate) / offsets[-1]
    return [float(t) for t in offsets]
