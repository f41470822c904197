"""What the router's HTTP layer knows about the served model and its own limits."""

from __future__ import annotations

from dataclasses import dataclass

from afd.errors import ConfigError

DEFAULT_MAX_REQUEST_BODY_BYTES = 2 * 1024 * 1024
"""2 MiB: a 128k-token context as text (~0.5 MB) or as JSON token ids (~1 MB) fits; tokenising 2 MB of text
takes about 0.5 s and 170 MB on one core, which is the most one request may cost the router."""


@dataclass
class ApiConfig:
    """What the HTTP layer needs to know about the served model."""

    model_name: str
    """Name clients must send in `model` (vLLM's --served-model-name)."""
    max_model_len: int
    """Prompt plus output tokens, at most."""
    vocab_size: int
    """Token ids in prompts must be below this."""
    api_key: str | None = None
    """Bearer token required on /v1 and /afd routes (vLLM's --api-key); None = open."""
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    """Larger request bodies get a 413 before they are read in full."""
    protect_metrics: bool = False
    """Require the API key on /metrics too (off by default, as in vLLM, so Prometheus scrapes without it)."""

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ConfigError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
