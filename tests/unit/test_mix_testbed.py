"""The mix testbed without touching the host: commands recorded by a fake runner, cgroups in a temporary
directory, stale runs told apart by their owner's pid, and the cgroup-joining wrapper run for real."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from afd.errors import ConfigError
from orchestration.testbed import NodeLimits, RunTag, Testbed, TestbedError, cgroup_preflight, cleanup_stale, leftovers
from orchestration.testbed.cluster import _replace_option
from orchestration.testbed.netns import tbf_args


class FakeRunner:
    """Records every command; answers `ip netns list`, `ip -o link show` and `ip netns pids` from its tables."""

    def __init__(self, netns: Sequence[str] = (), links: Sequence[str] = (), pids: dict[str, str] | None = None):
        self.commands: list[list[str]] = []
        self.netns, self.links, self.pids = list(netns), list(links), pids or {}

    def __call__(self, argv: Sequence[str], check: bool = True) -> str:
        argv = list(argv)
        self.commands.append(argv)
        if argv[:3] == ["ip", "netns", "list"]:
            return "".join(f"{n} (id: {i})\n" for i, n in enumerate(self.netns))
        if argv[:4] == ["ip", "-o", "link", "show"]:
            return "".join(f"{i + 10}: {n}@if{i + 9}: <BROADCAST,UP> mtu 1500\n" for i, n in enumerate(self.links))
        if argv[:3] == ["ip", "netns", "pids"]:
            return self.pids.get(argv[3], "")
        if argv[:4] == ["ip", "-4", "-o", "addr"]:
            return "1: lo    inet 127.0.0.1/8 scope host lo\n5: x    inet 10.213.0.1/24 brd 10.213.0.255\n"
        return ""

    def ran(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.commands if c[: len(prefix)] == list(prefix)]


def _cgroup_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    for controller in ("cpu", "cpuacct"):
        (root / controller).mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    return root


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_run_tags_name_their_owner_and_fit_interface_names():
    tag = RunTag(0x3FFFFF)  # the largest pid Linux hands out (pid_max 4194304)
    assert tag.tag == "afdm3fffffx"
    assert len(f"{tag.tag}199h") <= 15  # IFNAMSIZ - 1
    assert RunTag.parse(f"{tag.tag}attn-0") == tag
    assert RunTag.parse("afdmx") is None and RunTag.parse("eth0") is None and RunTag.parse("afdmzzx1") is None
    assert RunTag.mine().alive()
    assert not RunTag(_dead_pid()).alive()


def test_a_mix_is_built_and_torn_down_by_its_commands(tmp_path):
    runner, root = FakeRunner(), _cgroup_root(tmp_path)
    tag = RunTag(4242)
    testbed = Testbed(link_mbit=100, runner=runner, cgroup_root=root, tag=tag)
    testbed.start(check=False)
    assert testbed.router_host == "10.213.1.1"  # 10.213.0.x is taken on this (fake) host
    address = testbed.add_node("attn-0", NodeLimits(cpu_cores=0.5, threads=2))
    assert address == "10.213.1.2"
    group = root / "cpu" / "afdm1092xattn-0"
    assert (group / "cpu.cfs_quota_us").read_text() == "50000"
    assert (group / "cpu.cfs_period_us").read_text() == "100000"
    assert (root / "cpuacct" / "afdm1092xattn-0").is_dir()
    assert runner.ran("ip", "netns", "add", "afdm1092xattn-0")
    assert runner.ran("ip", "link", "add", "afdm1092x0h", "type", "veth", "peer", "name", "afdm1092x0n")
    assert runner.ran("ip", "link", "set", "afdm1092x0h", "master", "afdm1092xbr")
    assert runner.ran("ip", "-n", "afdm1092xattn-0", "addr", "add", "10.213.1.2/24", "dev", "afdm1092x0n")
    # both directions capped: the bridge end's egress and the node end's egress, in one-MTU segments
    assert runner.ran("ip", "link", "set", "dev", "afdm1092x0h", "gso_max_size", "1500")
    assert runner.ran("ip", "-n", "afdm1092xattn-0", "link", "set", "dev", "afdm1092x0n", "gso_max_size", "1500")
    assert runner.ran("tc", "qdisc", "add", "dev", "afdm1092x0h", "root", "tbf", "rate", "100mbit")
    assert runner.ran("tc", "-n", "afdm1092xattn-0", "qdisc", "add", "dev", "afdm1092x0n", "root", "tbf")

    argv = testbed.wrap("attn-0", ["python", "-m", "orchestration.cli", "node", "attn"])
    separator = argv.index("--")
    assert argv[:2] == ["sh", "-c"]
    assert argv[separator - 2 : separator] == [
        str(group / "cgroup.procs"),
        str(root / "cpuacct" / group.name / "cgroup.procs"),
    ]
    assert argv[separator + 1 :] == [
        "ip",
        "netns",
        "exec",
        "afdm1092xattn-0",
        "python",
        "-m",
        "orchestration.cli",
        "node",
        "attn",
    ]
    router = testbed.add_node("router", None, netns=False)
    assert router == testbed.router_host
    assert "ip" not in testbed.wrap("router", ["python"])  # the router stays in the root namespace
    assert (root / "cpu" / "afdm1092xrouter" / "cpu.cfs_quota_us").read_text() == "-1"

    for path in root.glob("*/afdm1092x*/cpu.*"):
        path.unlink()  # cgroupfs drops its control files with the directory; a temporary directory does not
    testbed.close()
    assert runner.ran("ip", "netns", "del", "afdm1092xattn-0")
    assert runner.ran("ip", "link", "del", "afdm1092x0h")
    assert runner.ran("ip", "link", "del", "afdm1092xbr")
    assert not list(root.glob("*/afdm*"))
    testbed.close()  # idempotent: nothing more is run
    assert len(runner.ran("ip", "link", "del", "afdm1092xbr")) == 1


def test_cleanup_removes_only_runs_whose_owner_is_gone(tmp_path):
    dead, live = RunTag(_dead_pid()), RunTag.mine()
    root = _cgroup_root(tmp_path)
    for tag in (dead, live):
        for controller in ("cpu", "cpuacct"):
            (root / controller / f"{tag.tag}ffn-0").mkdir()
    (root / "cpu" / "someone-elses").mkdir()
    runner = FakeRunner(
        netns=[f"{dead.tag}attn-0", f"{live.tag}attn-0", "other-ns"],
        links=[f"{dead.tag}br", f"{dead.tag}0h", f"{live.tag}br", "eth0"],
        pids={f"{dead.tag}attn-0": "999999\n"},
    )
    assert len(leftovers(runner, root)) == 7  # 2 namespaces, 3 links, 2 groups (one name in both hierarchies)
    stale = leftovers(runner, root, tag=dead)
    assert stale == [
        f"netns:{dead.tag}attn-0",
        f"link:{dead.tag}0h",
        f"link:{dead.tag}br",
        f"cgroup:{dead.tag}ffn-0",
    ]
    removed = cleanup_stale(runner, root)
    assert sorted(removed) == sorted(stale)
    assert runner.ran("ip", "netns", "del", f"{dead.tag}attn-0")
    assert runner.ran("kill", "-9", "999999")  # what still ran in the dead run's namespace
    assert runner.ran("ip", "link", "del", f"{dead.tag}br") and runner.ran("ip", "link", "del", f"{dead.tag}0h")
    deleted = {c[-1] for c in runner.ran("ip", "netns", "del")} | {c[-1] for c in runner.ran("ip", "link", "del")}
    assert not any(name.startswith(live.tag) or name in ("other-ns", "eth0") for name in deleted)
    assert not (root / "cpu" / f"{dead.tag}ffn-0").exists() and not (root / "cpuacct" / f"{dead.tag}ffn-0").exists()
    assert (root / "cpu" / f"{live.tag}ffn-0").is_dir() and (root / "cpu" / "someone-elses").is_dir()


def test_the_wrapper_joins_the_cgroups_before_the_command_runs_under_the_same_pid(tmp_path):
    runner, root = FakeRunner(), _cgroup_root(tmp_path)
    testbed = Testbed(link_mbit=None, runner=runner, cgroup_root=root, tag=RunTag(77))
    testbed.start(check=False)
    testbed.add_node("router", None, netns=False)
    for controller in ("cpu", "cpuacct"):
        (root / controller / "afdm4dxrouter" / "cgroup.procs").write_text("")
    argv = testbed.wrap("router", [sys.executable, "-c", "import os; print(os.getpid())"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    pid = done.stdout.strip()
    assert (root / "cpu" / "afdm4dxrouter" / "cgroup.procs").read_text().strip() == pid
    assert (root / "cpuacct" / "afdm4dxrouter" / "cgroup.procs").read_text().strip() == pid
    for path in root.glob("*/afdm4dx*/*"):
        path.unlink()  # what cgroupfs does once the process has exited and the group is removed
    testbed.close()
    assert not list(root.glob("*/afdm4dx*"))


def test_the_host_is_checked_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(TestbedError, match="needs root"):
        cgroup_preflight(tmp_path)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    (tmp_path / "cgroup.controllers").write_text("cpu memory")
    with pytest.raises(TestbedError, match="cgroup v2"):
        cgroup_preflight(tmp_path)
    (tmp_path / "cgroup.controllers").unlink()
    with pytest.raises(TestbedError, match="no cgroup v1 cpu controller"):
        cgroup_preflight(tmp_path)
    cgroup_preflight(_cgroup_root(tmp_path))  # as root with v1 cpu: no complaint


def test_limits_and_link_caps_are_validated():
    with pytest.raises(ConfigError, match="CPU limit"):
        NodeLimits(cpu_cores=0)
    with pytest.raises(ConfigError, match="threads"):
        NodeLimits(cpu_cores=1, threads=0)
    with pytest.raises(ConfigError, match="link cap"):
        Testbed(link_mbit=-5, runner=FakeRunner())
    with pytest.raises(TestbedError, match="before start"):
        Testbed(link_mbit=None, runner=FakeRunner()).add_node("attn-0", None)
    # the kernel refuses quotas under 1 ms per period: say so before writing
    testbed = Testbed(link_mbit=None, runner=FakeRunner(), cgroup_root=Path("/nonexistent"))
    testbed._started = True
    with pytest.raises(TestbedError, match="minimum"):
        testbed.add_node("attn-0", NodeLimits(cpu_cores=0.001))


def test_tbf_bucket_holds_an_offload_packet_and_node_arguments_are_replaced():
    assert tbf_args(20) == ["tbf", "rate", "20mbit", "burst", "1600", "latency", "200ms"]  # one segment
    assert tbf_args(10_000)[4] == str(int(10_000e6 / 8 * 20e-6))  # 20 us of a fast link
    args = ["--host", "127.0.0.1", "--threads", "1", "--port", "0"]
    assert _replace_option(args, "--host", "10.213.0.2") == ["--host", "10.213.0.2", "--threads", "1", "--port", "0"]
    assert _replace_option(["--port", "0"], "--threads", "2") == ["--port", "0", "--threads", "2"]
