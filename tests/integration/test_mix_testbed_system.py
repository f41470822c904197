"""The mix testbed on this host, as root: a node's cgroup has the quota and holds the process, its namespace
has the capped veth, and both `close()` and the stale-run cleanup leave no namespace, link, cgroup or process.
Skipped with the reason where the host lacks root, cgroup v1's cpu controller, network namespaces or tc."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from orchestration.testbed import NodeLimits, RunTag, Testbed, cleanup_stale
from tests.testbed_helpers import wait_for_no_leftovers, why_no_testbed

REASON = why_no_testbed()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"mix testbed unavailable: {REASON}")


def _dead_tag() -> RunTag:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return RunTag(int(done.stdout))


def _start_node(testbed: Testbed, node_id: str, limits: NodeLimits) -> tuple[subprocess.Popen[bytes], str]:
    address = testbed.add_node(node_id, limits)
    argv = testbed.wrap(node_id, [sys.executable, "-c", "import time; time.sleep(60)"])
    return subprocess.Popen(argv), address


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def test_a_node_gets_its_quota_namespace_and_capped_link_and_close_removes_them():
    testbed = Testbed(link_mbit=10)
    tag = testbed.run_tag
    testbed.start()
    process = None
    try:
        process, address = _start_node(testbed, "ffn-0", NodeLimits(cpu_cores=0.25))
        group = testbed.cgroups["ffn-0"]
        deadline = time.monotonic() + 10
        while process.pid not in group.pids() and time.monotonic() < deadline:
            time.sleep(0.02)  # the wrapper writes its pid into the group first thing; poll for it, bounded
        assert process.pid in group.pids()
        assert (group.cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "25000"
        netns = testbed.networks["ffn-0"].netns
        assert str(process.pid) in _ip("netns", "pids", netns).split()
        assert f"inet {address}/24" in _ip("-n", netns, "-4", "-o", "addr", "show")
        qdisc = subprocess.run(
            ["tc", "qdisc", "show", "dev", testbed.networks["ffn-0"].host_end], capture_output=True, text=True
        ).stdout
        assert "tbf" in qdisc and "10Mbit" in qdisc
        assert group.usage_ns() is not None
    finally:
        testbed.close()
        if process is not None:
            process.wait(timeout=10)  # killed by close(): it ran in the testbed's namespace and cgroup
    assert process.returncode == -9
    assert wait_for_no_leftovers(tag) == []


def test_a_dead_runs_namespace_link_cgroup_and_process_are_removed_by_prefix():
    tag = _dead_tag()  # a run whose owner is gone, as after `kill -9` of a benchmark
    testbed = Testbed(link_mbit=None, tag=tag)
    testbed.start()
    process, _ = _start_node(testbed, "attn-0", NodeLimits(cpu_cores=0.5))
    netns = testbed.networks["attn-0"].netns
    deadline = time.monotonic() + 10
    while str(process.pid) not in _ip("netns", "pids", netns).split() and time.monotonic() < deadline:
        time.sleep(0.02)  # until it runs in its namespace, as a dead run's nodes did
    testbed._started = False  # forget it, as a killed owner would: nothing of it is closed
    try:
        assert wait_for_no_leftovers(tag, timeout_s=0) != []
        removed = cleanup_stale()
        assert {f"netns:{tag.tag}attn-0", f"cgroup:{tag.tag}attn-0", f"link:{tag.tag}br"} <= set(removed)
        process.wait(timeout=10)
        assert wait_for_no_leftovers(tag) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        testbed._started = True
        testbed.close()
