"""What a user types on a GPU machine: `afd up --attn-device cuda --ffn-device cuda` serving the official openai
client the single-process CPU engine's greedy text, `afd status` naming the GPU of each node, and
`afd generate --device cuda` printing the CPU engine's tokens. Processes are started and stopped by their handles,
every wait has a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afd.builtin_model import builtin_model_dir
from tests.checkpoints import build_with_tokenizer
from tests.cluster_helpers import REPO_ROOT
from tests.engines import greedy_reference_texts
from tests.gpu.gpu_helpers import requires_cuda

pytestmark = requires_cuda

TEXT_PROMPTS = ["The capital of France is", "1 2 3 4 5"]
NEW_TOKENS = 8
START_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint with the demo model's tokenizer (the router tokenises text). fp32 on disk, so
    `--dtype auto` computes in fp32 on both devices and the text must be identical."""
    root = tmp_path_factory.mktemp("gpu-cluster")
    return build_with_tokenizer("qwen3_moe", root / "model", builtin_model_dir(root / "cache"))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _afd(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_afd_up_on_cuda_serves_the_openai_client_the_cpu_engines_text(model: Path, tmp_path: Path):
    openai = pytest.importorskip("openai")
    expected = greedy_reference_texts(model, TEXT_PROMPTS, NEW_TOKENS)
    env = _env(tmp_path)
    name = "gpu-openai"
    command = [sys.executable, "-m", "orchestration.cli", "up", "--model", str(model), "--port", "0"]
    command += ["--threads", "2", "--name", name, "--attn-device", "cuda", "--ffn-device", "cuda"]
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    state = tmp_path / "afd" / "clusters" / f"{name}.json"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not state.exists():
            assert up.poll() is None, f"afd up exited with {up.returncode}:\n{(tmp_path / 'up.log').read_text()}"
            assert time.monotonic() < deadline, f"afd up did not come up:\n{(tmp_path / 'up.log').read_text()}"
            time.sleep(0.2)
        api_url = json.loads(state.read_text())["api_url"]
        client = openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=120)
        served = client.models.list().data[0].id
        for prompt in TEXT_PROMPTS:
            completion = client.completions.create(
                model=served, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}
            )
            assert completion.choices[0].text == expected[prompt]

        status = _afd("status", "--name", name, "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        nodes = [n for n in json.loads(status.stdout)["nodes"] if n["role"] in ("attention", "ffn")]
        assert sorted(n["role"] for n in nodes) == ["attention", "ffn", "ffn"]
        for node in nodes:  # the GPU's name and memory, not the host's CPU
            assert not str(node["device_kind"]).lower().startswith("cpu"), node
            assert node["device_memory_bytes"] > 2**30, node
        table = _afd("status", "--name", name, env=env)
        assert "GiB" in table.stdout, table.stdout

        down = _afd("down", "--name", name, env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(timeout=120) == 0
    finally:
        if up.poll() is None:
            up.terminate()
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)
        log.close()


def test_afd_generate_on_cuda_prints_the_cpu_engines_tokens(model: Path, tmp_path: Path):
    """CUDA attention beside CPU FFN shards (all-CUDA is what `afd up` above and tests/gpu/test_engine_cuda.py run)."""
    env, ffn_device = _env(tmp_path), "cpu"
    common = ["generate", "--model", str(model), "--max-tokens", str(NEW_TOKENS), "--ignore-eos", "--json"]
    for prompt in TEXT_PROMPTS:
        common += ["--prompt", prompt]
    on_cpu = _afd(*common, env=env)
    on_gpu = _afd(*common, "--device", "cuda", "--ffn-device", ffn_device, env=env)
    assert on_cpu.returncode == 0 and on_gpu.returncode == 0, on_cpu.stdout + on_cpu.stderr + on_gpu.stderr
    gpu = json.loads(on_gpu.stdout)
    assert gpu["device"].startswith("cuda") and gpu["ffn_device"] == ffn_device
    tokens = [[o["token_ids"] for o in json.loads(run.stdout)["outputs"]] for run in (on_cpu, on_gpu)]
    assert tokens[0] == tokens[1]
