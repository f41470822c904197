"""Validation of an OpenAI request's prompt and length before it becomes a generation request.

The served model's name, the prompt's tokenisation (text or token ids; the chat template for chat), its
vocabulary and context length, and the number of tokens to generate. Each failure is an ApiError with the
message OpenAI's and vLLM's servers give, so clients can match on it. The tokenising functions are called
off the event loop (their cost grows with the prompt).
"""

from __future__ import annotations

from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.api_errors import ApiError
from router.protocol import ChatCompletionRequest, ChatMessage


def check_model(config: ApiConfig, model: str | None) -> None:
    if model is not None and model != config.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def tokenize(config: ApiConfig, tokenizer: Tokenizer | None, prompt: str | list[int]) -> list[int]:
    """Token ids of one prompt, checked against the vocabulary and the context (runs off the loop)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", "BadRequestError")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    return check_ids(config, ids)


def check_ids(config: ApiConfig, ids: list[int]) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt is empty", "BadRequestError", "prompt")
    if len(ids) >= config.max_model_len:  # no room for one output token: refuse before the vocab scan
        raise ApiError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, your "
            f"prompt has {len(ids)} tokens. Please reduce the length of the prompt.",
            "BadRequestError",
            "prompt",
        )
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary", "BadRequestError", "prompt")
    return ids


def chat_text(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The prompt text the chat template renders for `messages` (the same for chat completions and /tokenize)."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)


def chat_prompt(config: ApiConfig, tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenise it (runs off the loop)."""
    text = chat_text(tokenizer, body.messages, body.add_generation_prompt)
    return check_ids(config, tokenizer.encode(text, add_special_tokens=False))


def max_tokens(config: ApiConfig, prompt_len: int, requested: int | None, default: int | None) -> int:
    room = config.max_model_len - prompt_len
    wanted = requested if requested is not None else (min(default, room) if default else room)
    if room < 1 or wanted > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, you "
            f"requested {prompt_len + max(wanted, 1)} tokens ({prompt_len} in the prompt, {max(wanted, 1)} "
            "in the completion). Please reduce the length of the prompt or completion.",
            "BadRequestError",
            "max_tokens",
        )
    return wanted
