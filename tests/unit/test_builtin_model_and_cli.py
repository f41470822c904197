"""The built-in checkpoint is deterministic, loads in transformers, and `afd generate` runs on it."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from afd.builtin_model import builtin_model_dir
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from orchestration.cli import app
from tests.checkpoints import reference_greedy, reference_model
from tests.engines import inprocess_engine


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


def _digest(directory):
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_builtin_checkpoint_is_deterministic(builtin, tmp_path):
    again = builtin_model_dir(tmp_path)
    assert _digest(again) == _digest(builtin)
    assert builtin_model_dir(builtin.parent) == builtin  # cached: not rewritten


def test_builtin_checkpoint_matches_transformers(builtin):
    tokenizer = Tokenizer.from_pretrained(builtin)
    assert tokenizer is not None
    prompt = tokenizer.encode("the file object is used to read")
    assert tokenizer.decode(prompt) == "the file object is used to read"
    reference = reference_model(builtin)
    (tokens,) = inprocess_engine(builtin, 2).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert tokens == reference_greedy(reference, prompt, 12)


def test_generate_command_prints_text_and_throughput(builtin, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(builtin.parent.parent))
    monkeypatch.setattr("orchestration.generate_command.builtin_model_dir", lambda: builtin)
    result = CliRunner().invoke(app, ["generate", "--max-tokens", "5", "--ignore-eos", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"] == "Qwen3MoeForCausalLM"
    assert report["generated_tokens"] == 5 * len(report["outputs"]) and report["tokens_per_s"] > 0
    assert sum(report["ffn_shards"].values()) == 16 and len(report["ffn_shards"]) == 2
    assert all(len(o["text"].split()) == 5 for o in report["outputs"])


def test_generate_command_with_token_ids_and_bad_input(tiny_checkpoint):
    model = tiny_checkpoint("mixtral")  # no tokenizer.json: prompts are token ids
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(model),
            "--prompt",
            "1 2 3",
            "--max-tokens",
            "4",
            "--ffn-shards",
            "3",
            "--ignore-eos",
            "--json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.output)["outputs"][0]["token_ids"]) == 4
    bad = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hello"])
    assert bad.exit_code == 2 and "no tokenizer.json" in bad.output
    too_long = runner.invoke(app, ["generate", "--model", str(model), "--prompt", " ".join(["1"] * 300)])
    assert too_long.exit_code == 2 and "the context holds 256" in too_long.output


def test_unknown_architecture_from_the_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "1"])
    assert result.exit_code == 2
    assert "unsupported architecture 'BertModel'" in result.output and "Qwen3MoeForCausalLM" in result.output


def test_attention_node_with_nccl_and_no_gpu_refuses_to_start(builtin):
    from afd.transport.nccl import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("NCCL is usable here")
    args = ["node", "attn", "--router", "127.0.0.1:1", "--node-id", "a", "--transport", "nccl", "--model", str(builtin)]
    args.append("--insecure")  # a node without a token refuses to start unless told so
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "error: NCCL" in result.output and "use the gloo, shm or grpc transport" in result.output
