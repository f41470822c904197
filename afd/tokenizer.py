"""Text <-> token ids for checkpoints that ship a `tokenizer.json` (HF `tokenizers`), plus chat templates.

Checkpoints without one are served with token-id prompts only; `Tokenizer.from_pretrained` returns None.

The chat template is found where transformers (and so vLLM) look: an explicit file (the router's
`--chat-template`, vLLM's flag), else `chat_template.jinja` in the checkpoint (what transformers >= 4.50
saves; it wins over the config there too), else `chat_template` in tokenizer_config.json (a string, or a
list of named templates of which "default" is used). There is no built-in fallback: a guessed template
renders prompts the model was never trained on, so a checkpoint without one is refused on chat, as vLLM
refuses it. Templates render in a sandbox with the helpers Hub templates use (loop controls, `tojson`
without HTML escaping, `strftime_now`, `raise_exception`).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer
from tokenizers.decoders import DecodeStream

from afd.errors import ConfigError, RequestError


class Tokenizer:
    """A `tokenizers` tokenizer with the special-token and chat-template settings of tokenizer_config.json."""

    def __init__(
        self,
        tokenizer: HfTokenizer,
        config: dict[str, Any],
        chat_template: str | None = None,
        chat_template_source: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        if chat_template is None:
            chat_template, chat_template_source = _config_template(config, "tokenizer_config.json")
        self.chat_template: str | None = chat_template
        """Jinja source of the chat template; None when the checkpoint has none."""
        self.chat_template_source: str | None = chat_template_source
        """Where the template came from (a file, or the config key), for the router's start-up log."""
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        # What transformers passes to templates besides the messages (its special tokens map).
        self._template_tokens = {
            name: _token_text(config.get(name)) or ""
            for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        }

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, chat_template: str | Path | None = None) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None without tokenizer.json. `chat_template`: a Jinja file that
        replaces the checkpoint's template (the router's --chat-template)."""
        directory = Path(model_dir)
        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tokenizer = HfTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"cannot load {path}: {exc}") from exc
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from exc
        template, source = _find_chat_template(directory, config, chat_template)
        return cls(tokenizer, config, template, source)

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

    def token_strs(self, token_ids: list[int]) -> list[str]:
        """Each id's string in the vocabulary (transformers' convert_ids_to_tokens; "" for an id it lacks)."""
        return [self.tokenizer.id_to_token(t) or "" for t in token_ids]

    def stream_decoder(self, prompt_token_ids: list[int] | None = None) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the checkpoint's jinja chat template."""
        if not self.chat_template:
            raise RequestError("this model has no chat template; use /v1/completions")
        try:
            return _compiled(self.chat_template).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_tokens,
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


CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The file newer transformers save the chat template in, next to tokenizer_config.json."""


def _config_template(config: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """The template in a tokenizer config: a string, or [{"name", "template"}, ...] whose "default" is used."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(
                f"{where} has chat templates named {sorted(map(str, named))} but none named 'default'; "
                "pass one with --chat-template"
            )
        return named["default"], f"{where} (chat_template 'default')"
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where}: chat_template must be a string or a list of named templates")
    return (template, f"{where} (chat_template)") if template else (None, None)


def _find_chat_template(
    directory: Path, config: dict[str, Any], override: str | Path | None
) -> tuple[str | None, str | None]:
    """(template, where it came from): the override file, chat_template.jinja, tokenizer_config.json, none."""
    if override is not None:
        if not Path(override).is_file():
            raise ConfigError(f"--chat-template {override}: no such file")
        return _read_template(Path(override)), f"--chat-template {override}"
    path = directory / CHAT_TEMPLATE_FILE
    if path.is_file():
        return _read_template(path), str(path)
    return _config_template(config, str(directory / "tokenizer_config.json"))


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read chat template {path}: {exc}") from exc


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the characters themselves (as in transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
_JINJA.globals["raise_exception"] = _raise
_JINJA.globals["strftime_now"] = _strftime_now
_JINJA.filters["tojson"] = _tojson


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    """Compiled once per template, not per request (compiling a Hub template takes milliseconds)."""
    return _JINJA.from_string(source)
