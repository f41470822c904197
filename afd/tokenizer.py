"""Text <-> token ids for checkpoints that ship a `tokenizer.json` (HF `tokenizers`), plus chat templates.

Checkpoints without one are served with token-id prompts only; `Tokenizer.from_pretrained` returns None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer
from tokenizers.decoders import DecodeStream

from afd.errors import ConfigError, RequestError


class Tokenizer:
    """A `tokenizers` tokenizer with the special-token and chat-template settings of tokenizer_config.json."""

    def __init__(self, tokenizer: HfTokenizer, config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer | None:
        directory = Path(model_dir)
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tokenizer = HfTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"cannot load {path}: {exc}") from exc
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(tokenizer, config)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Releases the GIL while it works (`encode` holds it: a 4 MB prompt froze every
        other thread of the router, its event loop included, for over a second), and skips the offsets."""
        ids = self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.token_id(self.bos_token)
        if add_special_tokens and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, prompt_token_ids: list[int] | None = None) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the checkpoint's jinja chat template."""
        if not self.chat_template:
            raise RequestError("this model has no chat template; use /v1/completions")
        try:
            template = _JINJA.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise RequestError(f"chat template failed: {exc}") from exc


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas without re-decoding the whole output each step."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer.tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """Text that `token_id` completes ("" while a multi-byte character is still partial)."""
        return self._stream.step(self._tokenizer, token_id) or ""


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_JINJA.globals["raise_exception"] = _raise
