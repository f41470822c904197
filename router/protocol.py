"""OpenAI-compatible request bodies (with vLLM's extensions top_k, stop_token_ids, ignore_eos).

Unknown fields are ignored, as OpenAI's and vLLM's servers do; fields we cannot honour (n > 1, logprobs,
echo, penalties) are refused with a 400 that names them, rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from afd.errors import RequestError
from afd.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a final chunk with token usage before [DONE]."""
    continuous_usage_stats: bool = False
    """vLLM: attach usage to every chunk."""


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """Served model name; any other name is a 404."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the rest of the context, capped at 16 for completions like vLLM)."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    """Strings that end generation; not included in the output."""
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def unsupported(self) -> str | None:
        """Name of a requested feature this server does not implement, if any."""
        if self.n != 1:
            return "n > 1 is not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence/frequency penalties are not supported"
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in strings):
            raise RequestError("stop strings must not be empty")
        return strings

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    """Text, token ids, or a batch of either."""
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def unsupported(self) -> str | None:
        return "echo is not supported" if self.echo else super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts (one element for a single prompt)."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise RequestError(f"message content of type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
