"""Where the chat template comes from, as transformers and vLLM take it, and that it renders as transformers does.

Order: `--chat-template PATH` (vLLM's flag), else the checkpoint's `chat_template.jinja` (newer transformers save
the template there and it wins over the config, as in transformers), else `chat_template` in
tokenizer_config.json (a string, or a list of named templates of which "default" is used), else none
(/v1/chat/completions then answers 400). The router logs which one it uses.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from afd.builtin_model import CHAT_TEMPLATE, builtin_model_dir
from afd.errors import ConfigError
from afd.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FILE_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
# Constructs real Hub templates use (Qwen3's: namespace, loop controls, tojson; Llama 3's: strftime_now).
HUB_STYLE_TEMPLATE = (
    "{%- set ns = namespace(seen=0) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'tool' %}{% continue %}{% endif %}"
    "{%- set ns.seen = ns.seen + 1 %}"
    "<|{{ m['role'] }}|> {{ m['content'] | tojson }} "
    "{%- if ns.seen > 2 %}{% break %}{% endif %}"
    "{%- endfor %}"
    "{{- ' ' ~ (strftime_now('%Y') | length) }}"
    "{%- if add_generation_prompt %} <|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": 'be "brief" é'},
    {"role": "tool", "content": "skipped"},
    {"role": "user", "content": "the file object"},
    {"role": "assistant", "content": "is returned"},
    {"role": "user", "content": "cut off by break"},
]


@pytest.fixture
def demo_copy(tmp_path_factory, tmp_path):
    source = builtin_model_dir(tmp_path_factory.mktemp("cache"))
    target = tmp_path / "model"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    return target


def _set_config_template(directory, template):
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    path.write_text(json.dumps(config))


def _transformers_render(directory, messages=MESSAGES, add=True):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)


def test_the_checkpoints_tokenizer_config_template(demo_copy):
    tokenizer = Tokenizer.from_pretrained(demo_copy)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.chat_template_source == f"{demo_copy / 'tokenizer_config.json'} (chat_template)"


def test_chat_template_jinja_file_wins_over_the_config_as_in_transformers(demo_copy):
    (demo_copy / "chat_template.jinja").write_text(FILE_TEMPLATE)
    tokenizer = Tokenizer.from_pretrained(demo_copy)
    assert tokenizer.chat_template == FILE_TEMPLATE
    assert tokenizer.chat_template_source == str(demo_copy / "chat_template.jinja")
    assert tokenizer.apply_chat_template(MESSAGES) == _transformers_render(demo_copy)


def test_chat_template_jinja_file_alone(demo_copy):
    _set_config_template(demo_copy, None)
    (demo_copy / "chat_template.jinja").write_text(FILE_TEMPLATE)
    assert Tokenizer.from_pretrained(demo_copy).apply_chat_template(MESSAGES) == _transformers_render(demo_copy)


def test_named_templates_in_the_config_use_default(demo_copy):
    _set_config_template(
        demo_copy, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": FILE_TEMPLATE}]
    )
    tokenizer = Tokenizer.from_pretrained(demo_copy)
    assert tokenizer.chat_template == FILE_TEMPLATE
    assert "default" in tokenizer.chat_template_source
    assert tokenizer.apply_chat_template(MESSAGES) == _transformers_render(demo_copy)


def test_no_template_anywhere(demo_copy):
    _set_config_template(demo_copy, None)
    tokenizer = Tokenizer.from_pretrained(demo_copy)
    assert tokenizer.chat_template is None and tokenizer.chat_template_source is None
    with pytest.raises(Exception, match="no chat template"):
        tokenizer.apply_chat_template(MESSAGES)


def test_override_file_wins_over_everything(demo_copy, tmp_path):
    (demo_copy / "chat_template.jinja").write_text(FILE_TEMPLATE)
    override = tmp_path / "mine.jinja"
    override.write_text(HUB_STYLE_TEMPLATE)
    tokenizer = Tokenizer.from_pretrained(demo_copy, chat_template=override)
    assert tokenizer.chat_template == HUB_STYLE_TEMPLATE
    assert tokenizer.chat_template_source == f"--chat-template {override}"


def test_missing_override_file_is_a_clear_error(demo_copy, tmp_path):
    with pytest.raises(ConfigError, match=r"--chat-template .*nowhere\.jinja"):
        Tokenizer.from_pretrained(demo_copy, chat_template=tmp_path / "nowhere.jinja")


@pytest.mark.parametrize("add", [True, False])
def test_hub_style_template_renders_as_in_transformers(demo_copy, add):
    _set_config_template(demo_copy, HUB_STYLE_TEMPLATE)
    ours = Tokenizer.from_pretrained(demo_copy).apply_chat_template(MESSAGES, add_generation_prompt=add)
    assert ours == _transformers_render(demo_copy, add=add)
    assert '"be \\"brief\\" é"' in ours  # tojson keeps non-ASCII, as transformers' filter does


def test_router_logs_which_template_it_uses(demo_copy, caplog):
    from router.server import describe_chat_template

    with caplog.at_level(logging.INFO, logger="afd.router"):
        describe_chat_template(Tokenizer.from_pretrained(demo_copy))
        _set_config_template(demo_copy, None)
        describe_chat_template(Tokenizer.from_pretrained(demo_copy))
        describe_chat_template(None)
    first, second, third = (r.getMessage() for r in caplog.records)
    assert first == f"router: chat template: {demo_copy / 'tokenizer_config.json'} (chat_template)"
    assert "no chat template in the checkpoint" in second
    assert "no tokenizer.json" in third
