"""vLLM's tokenizer endpoints and the small endpoints clients probe: request/response bodies and their work.

`POST /tokenize` (a prompt, or chat messages through the chat template) -> {count, max_model_len, tokens
[, token_strs]}, `POST /detokenize` ({tokens} -> {prompt}), `GET /version` and `GET /v1/models/{id}`, in
the shapes of vLLM's entrypoints (serving_tokenization.py): benchmark clients count prompt tokens with
/tokenize, and the official client's `models.retrieve` calls /v1/models/{id}.

/tokenize does not refuse a prompt longer than the context: clients call it to find out how long a prompt is
(`max_model_len` is in the answer for that). Token ids sent to /detokenize are checked against the model's
vocabulary, and the answer names the first bad one. The tokenising work runs off the event loop, on the
OpenAI service's tokenizer thread.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag

from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.api_errors import ApiError
from router.prompt_checks import chat_text, check_model
from router.protocol import ChatMessage, Text, TokenId


class TokenizeCompletionRequest(BaseModel):
    """Tokenise a text prompt, as /v1/completions would."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"not": {"required": ["messages"]}})

    model: Text | None = None
    """Served model name; any other name is a 404."""
    prompt: Text
    add_special_tokens: StrictBool = True
    """Add the tokenizer's special tokens (e.g. BOS), as a completion prompt gets them."""
    return_token_strs: StrictBool | None = False
    """Also return each token's string in the vocabulary."""


class TokenizeChatRequest(BaseModel):
    """Tokenise chat messages rendered with the model's chat template, as /v1/chat/completions would."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    """Served model name; any other name is a 404."""
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    """Append the assistant turn's opening, as a chat completion does."""
    add_special_tokens: StrictBool = False
    """Add special tokens on top of the template's (vLLM's default: the template has them)."""
    return_token_strs: StrictBool | None = False
    """Also return each token's string in the vocabulary."""


def _kind(value: Any) -> str:
    """A body with `messages` is a chat request (the completion schema forbids that key), any other a prompt."""
    if isinstance(value, dict):
        return "chat" if "messages" in value else "completion"
    return "chat" if isinstance(value, TokenizeChatRequest) else "completion"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion")] | Annotated[TokenizeChatRequest, Tag("chat")],
    Discriminator(_kind),
]
"""vLLM's TokenizeRequest: a prompt or chat messages."""


class TokenizeResponse(BaseModel):
    count: int
    """Number of tokens."""
    max_model_len: int
    """The context limit (prompt plus output tokens), so a client can check its prompt against it."""
    tokens: list[int]
    token_strs: list[str] | None = None
    """Each token's vocabulary string, when return_token_strs was set."""


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    """Served model name; any other name is a 404."""
    tokens: list[TokenId]
    """Token ids to turn into text; each must be in the model's vocabulary."""


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def _tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer (no tokenizer.json in the checkpoint)", "BadRequestError")
    return tokenizer


def tokenize(
    config: ApiConfig, tokenizer: Tokenizer | None, body: TokenizeCompletionRequest | TokenizeChatRequest
) -> TokenizeResponse:
    """The /tokenize answer (runs off the event loop: its cost grows with the prompt)."""
    check_model(config, body.model)
    tok = _tokenizer(tokenizer)
    if isinstance(body, TokenizeChatRequest):
        text = chat_text(tok, body.messages, body.add_generation_prompt)
    else:
        text = body.prompt
    ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
    strs = tok.token_strs(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=config.max_model_len, tokens=ids, token_strs=strs)


def detokenize(config: ApiConfig, tokenizer: Tokenizer | None, body: DetokenizeRequest) -> DetokenizeResponse:
    """The /detokenize answer; a token id outside the vocabulary is a 400 that names it."""
    check_model(config, body.model)
    tok = _tokenizer(tokenizer)
    for position, token in enumerate(body.tokens):
        if token >= config.vocab_size:
            raise ApiError(
                400,
                f"token id {token} (tokens[{position}]) is outside the vocabulary of {config.vocab_size} tokens "
                f"(ids 0..{config.vocab_size - 1})",
                "BadRequestError",
                "tokens",
            )
    return DetokenizeResponse(prompt=tok.decode(body.tokens))
