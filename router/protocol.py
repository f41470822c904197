"""OpenAI-compatible request bodies (with vLLM's extensions top_k, stop_token_ids, ignore_eos, min_tokens,
repetition_penalty, include_stop_str_in_output, return_token_ids, return_tokens_as_token_ids).

Unknown fields are ignored, as OpenAI's and vLLM's servers do. Values out of range (n < 1, logprobs or
top_logprobs outside 0..20, a logit_bias key that is not a token id or a bias outside -100..100) get a 400
that names the field.

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
    model_validator,
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
MAX_N = 128
"""Most choices per prompt (OpenAI's limit); each is a generation on the attention nodes."""
MAX_LOGPROBS = 20
"""Most top logprobs per token (OpenAI's and vLLM's default limit)."""
LogitBiasKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]
"""A token id written as a decimal string (JSON object keys are strings); checked against the vocabulary later."""
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]
NumLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


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
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    """Choices per prompt, each its own generation (with a seed, choice i samples with seed + i, as vLLM)."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """OpenAI: lowers the logits of tokens already in the output."""
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """OpenAI: lowers the logits of tokens in proportion to their count in the output."""
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    """vLLM / HF: > 1 discourages tokens of the prompt and the output, < 1 encourages them."""
    min_tokens: Int32 = Field(default=0, ge=0)
    """vLLM: EOS and stop_token_ids cannot end the output before this many tokens."""
    logit_bias: dict[LogitBiasKey, LogitBias] | None = None
    """Token id (as a string, as OpenAI sends it) -> bias added to its logit; ids are checked against the vocabulary."""
    include_stop_str_in_output: StrictBool = False
    """vLLM: keep the matched stop string (or the stop token's text) in the output."""
    return_token_ids: StrictBool = False
    """vLLM: choices carry `token_ids` and `prompt_token_ids` (the output of a tokenizer-less checkpoint)."""
    return_tokens_as_token_ids: StrictBool = False
    """vLLM: logprob tokens are written "token_id:N" instead of their text."""
    user: str | None = None

    def unsupported(self) -> str | None:
        """Name of a requested feature this server does not implement, if any (none left today)."""
        return None

    def num_logprobs(self) -> int | None:
        """How many top logprobs each output token gets (None: no logprobs)."""
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in strings):
            raise RequestError("stop strings must not be empty")
        return strings

    def sampling_params(self, max_tokens: int, choice: int = 0, prompt_logprobs: int | None = None) -> SamplingParams:
        """The parameters of choice `choice`: vLLM's parallel sampling gives child i the seed seed + i
        (wrapped into int64), so choices differ yet each is reproducible."""
        seed = self.seed
        if seed is not None and choice:
            seed = (seed + choice - INT64_MIN) % 2**64 + INT64_MIN
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.num_logprobs(),
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=min(self.min_tokens, max_tokens),
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
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
    """Prepend the prompt to each choice's text (and, with logprobs, its tokens' logprobs, the first None)."""
    logprobs: NumLogprobs | None = None
    """Logprobs of each token and of the `logprobs` most likely ones (0..20)."""

    def num_logprobs(self) -> int | None:
        return self.logprobs

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
    logprobs: StrictBool = False
    """Return each output token's logprob."""
    top_logprobs: NumLogprobs | None = None
    """With logprobs: the most likely tokens at each position (0..20)."""

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:  # vLLM's check, same words
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- response bodies: what /openapi.json promises (the service builds them as dicts of the same shape) ----
FinishReason = Literal["stop", "length", "abort"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per token (a prompt's first token,
    with echo, has None: nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    """The sampled token and the `logprobs` most likely ones, token text -> logprob (up to logprobs + 1)."""
    text_offset: list[int]
    """Character offset of each token in the choice's text."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    token_ids: list[int] | None = None
    """With return_token_ids: the generated token ids (the stop token included)."""
    prompt_token_ids: list[int] | None = None
    """With return_token_ids: the prompt's token ids."""


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    """The token's UTF-8 bytes."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    """The `top_logprobs` most likely tokens at this position, most likely first."""


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    token_ids: list[int] | None = None
    """With return_token_ids: the generated token ids."""


class ChatCompletionResponse(BaseModel):
    """A non-streaming /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None
    """With return_token_ids: the prompt's token ids (after the chat template)."""


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
