"""The built-in demo checkpoint's tokenizer is the same through transformers' AutoTokenizer and afd.tokenizer.

Clients (GuideLLM, AIPerf, lm-eval) count and build prompts with `AutoTokenizer.from_pretrained`; when it
loaded a Qwen2 byte-level tokenizer from config.json's model type instead of the checkpoint's word-level
tokenizer.json, "the file object is returned by the function" became [407, 407, 407] on the client and eight
ids on the server, so every prompt the client sized had the wrong length.
"""

from __future__ import annotations

import json

import pytest

from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "the file object is returned by the function",
    "return a new list of values",
    "zebra quantum frobnicate the list",  # words outside the vocabulary -> <unk>
    "if the default encoding is not given, raise an error.",  # punctuation
    "<|user|> hello <|assistant|>",  # special tokens in text
    "",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = builtin_model_dir(tmp_path_factory.mktemp("cache"))
    ours = Tokenizer.from_pretrained(directory)
    assert ours is not None
    return ours, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("text", SENTENCES)
def test_autotokenizer_and_afd_tokenizer_agree(demo, text):
    ours, theirs = demo
    ids = ours.encode(text)
    assert theirs(text).input_ids == ids
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert theirs.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)


def test_known_words_are_their_own_tokens(demo):
    ours, theirs = demo
    ids = theirs("the file object is returned by the function").input_ids
    assert len(ids) == 8 and theirs.unk_token_id not in ids
    assert theirs.decode(ids) == "the file object is returned by the function"
    assert theirs("zebra").input_ids == [theirs.unk_token_id] == [ours.token_id("<unk>")]


def test_special_tokens_agree(demo):
    ours, theirs = demo
    assert type(theirs).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert theirs.eos_token == ours.eos_token == "<|endoftext|>"
    assert theirs.eos_token_id == ours.token_id(ours.eos_token) == 0  # config.json's eos_token_id
    assert theirs.bos_token is None and ours.bos_token is None
    assert theirs.unk_token == "<unk>"
    assert len(theirs) == ours.vocab_size


def test_chat_template_renders_the_same(demo):
    ours, theirs = demo
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the file object"}]
    for add in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected


def test_the_cache_key_covers_the_tokenizer_files(monkeypatch, tmp_path):
    """A directory cached by a release with another tokenizer_config.json is not reused (it has another name)."""
    import afd.builtin_model as builtin

    before = builtin.fingerprint()
    written = json.loads((builtin_model_dir(tmp_path) / "tokenizer_config.json").read_text())
    assert written == builtin._tokenizer_config()
    monkeypatch.setattr(builtin, "_tokenizer_config", lambda: {**written, "tokenizer_class": None})
    assert builtin.fingerprint() != before
    assert builtin_model_dir(tmp_path).name != f"builtin-qwen3-moe-{before}"
