"""A node started with another checkpoint than the router's is refused at registration (model_fingerprint)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from afd.builtin_model import builtin_model_dir
from orchestration.local_cluster import LocalCluster, LocalClusterConfig

pytestmark = pytest.mark.slow


def test_ffn_node_with_another_checkpoint_is_refused_and_exits(tmp_path, tiny_checkpoint):
    cluster = LocalCluster(
        LocalClusterConfig(model=builtin_model_dir(tmp_path / "cache"), attn=1, ffn=1, http_port=0, threads_per_node=1)
    )
    log_path = tmp_path / "stranger.log"
    stranger = None
    try:
        cluster.start()
        command = [sys.executable, "-m", "orchestration.cli", "node", "ffn", "--router"]
        command += [f"127.0.0.1:{cluster.grpc_port}", "--node-id", "ffn-stranger", "--model"]
        command += [str(tiny_checkpoint("qwen3_moe")), "--cluster-token-file", str(cluster.token_file)]
        with log_path.open("wb") as log:
            stranger = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        assert stranger.wait(timeout=120) != 0
        output = log_path.read_text(errors="replace")
        assert "the router refused registration" in output and "same --model" in output, output[-2000:]
        assert sorted(n["node_id"] for n in cluster.cluster()["nodes"]) == ["attn-0", "ffn-0"]
    finally:
        if stranger is not None and stranger.poll() is None:
            stranger.kill()
            stranger.wait(10)
        cluster.stop(timeout=20)
        cluster.remove_workdir()
