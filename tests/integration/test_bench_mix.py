"""`afd bench mix` for real on this host (root, cgroup v1, network namespaces, tc): the two mixes of
benchmarks/mixes/smoke.yaml (and the calibration mix) on the built-in demo model, in under 3 minutes, and
nothing left behind: no namespace, veth, bridge or cgroup of the run, and no node process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.testbed import RunTag
from tests.cluster_helpers import REPO_ROOT
from tests.testbed_helpers import wait_for_no_leftovers, why_no_testbed

REASON = why_no_testbed()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"mix testbed unavailable: {REASON}")]
LIMIT_S = 180.0


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_two_mixes_run_measured_and_predicted_and_leave_nothing_behind(tmp_path):
    out, report, plots = tmp_path / "result.json", tmp_path / "report.md", tmp_path / "plots"
    work = tmp_path / "work"  # the clusters' work directories (and so their node command lines) are in here
    work.mkdir()
    command = [sys.executable, "-m", "orchestration.cli", "bench", "mix", "--mixes"]
    command += [str(REPO_ROOT / "benchmarks" / "mixes" / "smoke.yaml"), "--out", str(out), "--report", str(report)]
    command += ["--plot", str(plots)]
    env = {**os.environ, "TMPDIR": str(work), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=LIMIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert elapsed < LIMIT_S

    result = json.loads(out.read_text())
    assert [row["mix"] for row in result["mixes"]] == ["a1f1-1core-1g", "a1f2-half-100m"]
    assert result["failed_mixes"] == []
    assert result["calibration"]["run"]["completed"] > 0
    assert "link_runs" not in result["calibration"]  # the smoke file turns the per-cap calibration off
    assert "recheck_run" not in result["calibration"]  # and the run after the mixes
    for row, (attention, ffn) in zip(result["mixes"], [(1, 1), (1, 2)], strict=True):
        assert row["completed"] == row["num_prompts"] and row["failed"] == 0
        assert (row["attention"]["count"], row["ffn"]["count"]) == (attention, ffn)
        assert row["topology"]["attention_nodes"] == attention and row["topology"]["ffn_nodes"] == ffn
        assert row["measured"]["decode_tok_s"] > 0 and row["predicted"]["decode_tok_s"] > 0
        assert row["error"]["decode_tok_s"] is not None
        busy = row["measured"]["busy"]
        assert busy["attention"]["nodes"] == attention and busy["ffn"]["nodes"] == ffn
        # the kernel's CPU time of a node limited to q cores cannot exceed q cores of wall time (5 % slack)
        assert busy["attention"]["max_cores"] <= row["attention"]["cpu_limit_cores"] * 1.05
        assert busy["ffn"]["max_cores"] <= row["ffn"]["cpu_limit_cores"] * 1.05
        # every node bound its own namespace's address in the testbed's subnet, not loopback
        addresses = row["attention"]["addresses"] + row["ffn"]["addresses"]
        assert len(addresses) == attention + ffn and all(a.startswith("10.213.") for a in addresses)
        assert len({a.split(":")[0] for a in addresses}) == attention + ffn
    assert "| a1f2-half-100m |" in report.read_text()
    assert sorted(p.name for p in plots.iterdir()) == ["measured_vs_predicted.png", "pareto.png"]

    assert wait_for_no_leftovers(RunTag(process.pid)) == []
    assert _processes_mentioning(str(work)) == []
