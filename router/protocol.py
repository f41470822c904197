"""OpenAI-compatible request bodies (with vLLM's extensions top_k, stop_token_ids, ignore_eos).

Unknown fields are ignored, as OpenAI's and vLLM's servers do; fields we cannot honour (n > 1, logprobs,
echo, penalties) are refused with a 400 that names them, rather than silently ignored.

The schema is the contract published at /openapi.json, so it is strict where the server is: integers are
JSON integers (no 1.0, no booleans) within the range of the protobuf fields they travel in (int32 token
ids, top_k and max_tokens; int64 seed), booleans are JSON booleans, and text must be valid Unicode (a lone
UTF-16 surrogate such as "\\ud800" cannot be tokenised and is refused here with a 400).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from afd.errors import RequestError
from afd.sampling_params import SamplingParams

INT32_MAX = 2**31 - 1
"""Largest value of a protobuf int32 (token ids, top_k and max_tokens travel as int32 to the nodes)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Range of a protobuf int64 (the per-request seed)."""


def _valid_unicode(text: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates from JSON escapes like "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A string that the tokenizer can take."""
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
"""A token id as a JSON integer; the vocabulary bound is checked by the service, which knows the model."""
Int32 = Annotated[StrictInt, Field(le=INT32_MAX)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    """Send a final chunk with token usage before [DONE]."""
    continuous_usage_stats: StrictBool = False
    """vLLM: attach usage to every chunk."""


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    """Served model name; any other name is a 404."""
    max_tokens: Int32 | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the rest of the context, capped at 16 for completions like vLLM)."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Int32 = Field(default=0, ge=-1)
    """Keep the k most likely tokens; 0 or -1 disables (vLLM)."""
    seed: StrictInt | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    """Per-request seed for reproducible sampling (int64, like vLLM's)."""
    stop: Text | list[Text] | None = None
    """Strings that end generation; not included in the output."""
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    ignore_eos: StrictBool = False
    n: StrictInt = Field(default=1, ge=1)
    """Choices per prompt; only 1 is implemented (larger values get a 400 that says so)."""
    stream: StrictBool = False
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


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptInput = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)
"""Text, a batch of texts, token ids, or a batch of token-id lists; nothing in it may be empty."""
_PROMPT = TypeAdapter(PromptInput)


def _check_prompt(value: Any) -> Any:
    """Validate against PromptInput, with one clear reason instead of one error per union member."""
    try:
        return _PROMPT.validate_python(value)
    except ValidationError as exc:
        items = value if isinstance(value, list) else [value]
        if value in ("", []) or any(item in ("", []) for item in items):
            raise ValueError("the prompt is empty") from None
        for error in exc.errors():
            if error["type"] == "string_unicode":
                raise ValueError("text is not valid Unicode (lone surrogate)") from None
            if error["type"] in ("value_error", "less_than_equal", "greater_than_equal"):
                raise ValueError(error["msg"].removeprefix("Value error, ")) from None
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids (integers) or a list of such lists"
        ) from None


Prompt = Annotated[Any, PlainValidator(_check_prompt), WithJsonSchema(_PROMPT.json_schema())]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    """Text, token ids, or a batch of either."""
    echo: StrictBool = False

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


class ContentPart(BaseModel):
    """One part of a message's content; only {"type": "text", "text": ...} is served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise RequestError(f"message content of type {part.type!r} is not supported (text only)")
            parts.append(part.text or "")
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int32 | None = Field(default=None, ge=1)
    add_generation_prompt: StrictBool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- response bodies: what /openapi.json promises (the service builds them as dicts of the same shape) ----
FinishReason = Literal["stop", "length", "abort"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """A non-streaming /v1/completions answer (streaming sends `text/event-stream` chunks instead)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    """A non-streaming /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "afd"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    """/health: 200 with "ok" when a request could be served now, else 503 with "unavailable"."""

    status: Literal["ok", "unavailable"]
