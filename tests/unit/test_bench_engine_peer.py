"""`afd bench engine --peer vllm`: the peer protocol against a stand-in `vllm` package, and the skip reasons.

The real vLLM lives in another virtualenv (benchmarks/README.md); here a small fake `vllm` module on
PYTHONPATH plays it, so the worker script, the JSON-lines protocol, the alternation and the fields the
benchmark prints are all exercised without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks import engine
from benchmarks.vllm_peer import PeerUnavailable, VllmPeer, resolve_python
from tests.checkpoints import build_checkpoint

FAKE_VLLM = """
import importlib.util

# transformers probes for a package named `kernels`; benchmarks/kernels.py must not answer (it did once).
_spec = importlib.util.find_spec("kernels")
assert _spec is None or "benchmarks" not in str(_spec.origin), f"benchmarks/ shadows packages: {_spec.origin}"
__version__ = "0.0-fake"
calls = []


class SamplingParams:
    def __init__(self, max_tokens, temperature, ignore_eos, detokenize):
        assert temperature == 0.0 and ignore_eos and not detokenize
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Output:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]


class LLM:
    def __init__(self, model, dtype, skip_tokenizer_init, max_num_seqs, max_model_len, seed):
        assert skip_tokenizer_init and dtype == "bfloat16"
        print("vLLM logs to stdout; the protocol must not see this")
        # vLLM starts an engine-core process; this child stands for it (the pid is written where a test reads it)
        import os, subprocess
        self.engine_core = subprocess.Popen(["sleep", "300"])
        if os.environ.get("FAKE_VLLM_CHILD_PID"):
            with open(os.environ["FAKE_VLLM_CHILD_PID"], "w") as out:
                out.write(str(self.engine_core.pid))

    def generate(self, prompts, params, use_tqdm):
        return [_Output([p["prompt_token_ids"][0]] * params.max_tokens) for p in prompts]
"""


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    return Path(sys.executable)


def test_the_peer_answers_each_generate_on_its_own_stream(fake_vllm: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    peer = VllmPeer(resolve_python(str(fake_vllm)), model, "bfloat16", 4, 64, preload=False)
    try:
        assert peer.version == "0.0-fake"
        # stopped between its runs, so that an idle vLLM's polling does not slow the other sides' runs
        assert peer.state() == "T"
        seconds, tokens, first = peer.generate([[7, 1], [9, 2]], 3)
        assert tokens == 6 and first == [7, 7, 7] and seconds >= 0
        assert peer.state() == "T"
        assert peer.generate([[5]], 2)[1:] == (2, [5, 5])
    finally:
        peer.close()
    assert peer.state() == ""
    assert "vLLM logs to stdout" in peer.log_path.read_text()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's reaper may take its time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_paused_peer_dies_with_a_killed_benchmark(fake_vllm: Path, tmp_path: Path) -> None:
    """SIGKILL of the benchmark (no `finally`, no close) must not leave the stopped vLLM worker, nor the engine-core
    process vLLM starts, behind."""
    model = tmp_path / "model"
    model.mkdir()
    script = (
        "import sys, time; from pathlib import Path; from benchmarks.vllm_peer import VllmPeer; "
        f"peer = VllmPeer(Path(sys.executable), Path({str(model)!r}), 'bfloat16', 2, 64, preload=False); "
        "print(peer._process.pid, peer.state(), flush=True); time.sleep(120)"
    )
    repo = Path(__file__).resolve().parents[2]
    child_file = tmp_path / "engine-core.pid"
    env = os.environ | {"FAKE_VLLM_CHILD_PID": str(child_file)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=repo, env=env)
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pid, state = parent.stdout.readline().split()
        pids = [int(pid), int(child_file.read_text())]
        assert state == "T"  # stopped: it cannot notice the end of its stdin by itself
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "the vLLM worker or its engine-core child outlived the benchmark"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_the_benchmark_reports_vllm_beside_the_engine(fake_vllm: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine, "read_bandwidth_gbs", lambda **_: 10.0)
    monkeypatch.setattr(engine, "copy_bandwidth_gbs", lambda **_: 10.0)
    model = build_checkpoint("qwen3_moe", tmp_path / "model")
    peer = VllmPeer(fake_vllm, model, "bfloat16", 2, 64, preload=False)
    try:
        results, _ = engine.run([1, 2], 6, 3, 2, model, repeats=2, peer=peer)
    finally:
        peer.close()
    for r in results:
        assert r.vllm_tok_s is not None and r.vllm_tok_s > 0
        assert r.ratio_vs_vllm == pytest.approx(r.engine_tok_s / r.vllm_tok_s, rel=0.01, abs=1e-3)
        assert r.vllm_tok_s_spread is not None and r.vllm_tok_s_spread["min"] <= r.vllm_tok_s_spread["max"]
        assert r.engine_tok_s_spread["max"] == pytest.approx(r.engine_tok_s, abs=0.01)
        assert r.vllm_same_leading_tokens is not None and 0 <= r.vllm_same_leading_tokens <= 3


def test_missing_or_broken_peer_interpreters_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AFD_VLLM_PYTHON", raising=False)
    with pytest.raises(PeerUnavailable, match="pass --peer-python PATH or set AFD_VLLM_PYTHON"):
        resolve_python(None)
    with pytest.raises(PeerUnavailable, match="does not exist"):
        resolve_python(str(tmp_path / "no-python"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no vllm package there
    with pytest.raises(PeerUnavailable, match="cannot import vllm"):
        resolve_python(sys.executable)


def test_bench_engine_skips_the_peer_with_one_line(tmp_path: Path, monkeypatch) -> None:
    """Absent the vLLM venv, the command still runs and says why the vLLM column is missing."""
    from orchestration.cli import app

    monkeypatch.delenv("AFD_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(engine, "read_bandwidth_gbs", lambda **_: 10.0)
    monkeypatch.setattr(engine, "copy_bandwidth_gbs", lambda **_: 10.0)
    model = build_checkpoint("qwen3_moe", tmp_path / "model")
    args = ["bench", "engine", "--checkpoint", str(model), "--batch", "1", "--new-tokens", "2", "--prompt-len", "4"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--peer", "vllm"])
    assert result.exit_code == 0, result.output
    assert "vLLM peer skipped: no vLLM interpreter: pass --peer-python PATH or set AFD_VLLM_PYTHON" in result.output
    assert '"vllm_tok_s": null' in result.output
    bad = CliRunner().invoke(app, [*args, "--peer", "sglang"])
    assert bad.exit_code != 0 and "unknown peer 'sglang'" in bad.output
