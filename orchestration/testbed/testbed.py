"""One mix's testbed: the bridge, a namespace + capped veth + CPU-limited cgroup per node, and its teardown.

    testbed = Testbed(link_mbit=1000)
    testbed.start()                                   # refuses (TestbedError) without root, cgroups, ip/tc
    try:
        address = testbed.add_node("attn-0", NodeLimits(cpu_cores=0.5, threads=1))   # the node binds it
        argv = testbed.wrap("attn-0", ["python", "-m", ...])
        ...                                           # Popen(argv): the node runs limited, in its namespace
    finally:
        testbed.close()                               # also registered with atexit

A wrapped command first writes its own pid into the node's cgroups (so it is limited before the node's code
runs), then execs `ip netns exec NS ...`, which execs the node: the pid a launcher holds is the node's.
"""

from __future__ import annotations

import atexit
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from afd.errors import ConfigError
from orchestration.testbed.cgroups import CGROUP_ROOT, CpuCgroup, cgroup_preflight, testbed_cgroups
from orchestration.testbed.commands import CommandRunner, SystemRunner, TestbedError
from orchestration.testbed.names import RunTag
from orchestration.testbed.netns import (
    NodeNetwork,
    TestbedNetwork,
    remove_netns,
    testbed_links,
    testbed_namespaces,
)

log = logging.getLogger("afd.testbed")

# Joins each cgroup given before `--` (pid of this shell, which then execs the command: same pid).
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True, slots=True)
class NodeLimits:
    """The hardware one node gets."""

    cpu_cores: float | None
    """CFS quota in cores (0.5: half a core per period); None: no limit."""
    threads: int = 1
    """torch threads of the node (`--threads`)."""

    def __post_init__(self) -> None:
        if self.cpu_cores is not None and not self.cpu_cores > 0:
            raise ConfigError(f"a CPU limit must be > 0 cores, got {self.cpu_cores}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


class Testbed:
    """The resources of one mix; every name carries this process's tag."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        link_mbit: float | None,
        runner: CommandRunner | None = None,
        cgroup_root: Path = CGROUP_ROOT,
        tag: RunTag | None = None,
    ) -> None:
        if link_mbit is not None and not link_mbit > 0:
            raise ConfigError(f"a link cap must be > 0 Mbit/s, got {link_mbit}")
        self.link_mbit = link_mbit
        self.runner: CommandRunner = runner or SystemRunner()
        self.cgroup_root = cgroup_root
        self.run_tag = tag or RunTag.mine()
        self.network = TestbedNetwork(self.runner, self.run_tag.tag)
        self.cgroups: dict[str, CpuCgroup] = {}
        self.networks: dict[str, NodeNetwork] = {}
        self._started = False

    @property
    def router_host(self) -> str:
        """Address the router binds and every node and the client reach it at."""
        return self.network.gateway

    def preflight(self) -> None:
        """Raise TestbedError saying what is missing (root, cgroup v1 cpu, ip, tc)."""
        cgroup_preflight(self.cgroup_root)
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise TestbedError(f"`{tool}` is not installed (the mix testbed needs iproute2)")

    def start(self, check: bool = True) -> None:
        """Check the host, remove stale runs' leftovers, bring the bridge up; close() is registered at exit."""
        if check:
            self.preflight()
        removed = cleanup_stale(self.runner, self.cgroup_root)
        if removed:
            log.warning("removed leftovers of earlier testbed runs: %s", ", ".join(removed))
        atexit.register(self.close)
        self._started = True
        try:
            self.network.up()
        except BaseException:
            self.close()
            raise

    def add_node(self, node_id: str, limits: NodeLimits | None, netns: bool = True) -> str:
        """Make `node_id`'s cgroups (with `limits`' quota) and, when `netns`, its namespace on a capped veth;
        returns the address the node binds (its namespace's, or the bridge's outside namespaces)."""
        if not self._started:
            raise TestbedError("Testbed.add_node before start()")
        if node_id in self.cgroups:
            raise TestbedError(f"node {node_id} is already on the testbed")
        group = CpuCgroup(f"{self.run_tag.tag}{node_id}", self.cgroup_root)
        self.cgroups[node_id] = group  # recorded first: close() removes a half-made group
        group.create(limits.cpu_cores if limits else None)
        if netns:
            self.networks[node_id] = self.network.add_node(node_id, self.link_mbit)
        return self.address(node_id)

    def wrap(self, node_id: str, argv: Sequence[str]) -> list[str]:
        """`argv` as it must be started: joining the node's cgroups, then exec'd in its namespace (if any)."""
        group = self.cgroups.get(node_id)
        if group is None:
            raise TestbedError(f"node {node_id} is not on the testbed (add_node first)")
        network = self.networks.get(node_id)
        command = network.wrap(argv) if network else list(argv)
        files = [str(f) for f in group.procs_files()]
        return ["sh", "-c", _JOIN_CGROUPS, "afd-cgexec", *files, "--", *command]

    def address(self, node_id: str) -> str:
        """The address `node_id` binds (its namespace's, or the bridge's for a node outside namespaces)."""
        network = self.networks.get(node_id)
        return network.address if network else self.router_host

    def cpu_usage_ns(self) -> dict[str, int]:
        """CPU time of every node so far (cpuacct), ns."""
        return {n: u for n, g in self.cgroups.items() if (u := g.usage_ns()) is not None}

    def throttling(self) -> dict[str, dict[str, int]]:
        """The kernel's CFS throttling counters of every node's group."""
        return {node_id: group.throttled() for node_id, group in self.cgroups.items()}

    def close(self) -> None:
        """Remove everything of this run: namespaces (killing what runs there), veths, bridge, cgroups.

        Idempotent; runs from `finally` and at exit. Errors are logged, not raised, so one failed removal
        does not leave the rest behind.
        """
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.close)
        try:
            self.network.close()
        except TestbedError as error:
            log.error("testbed network teardown: %s", error)
        for group in self.cgroups.values():
            try:
                group.remove()
            except TestbedError as error:
                log.error("testbed cgroup teardown: %s", error)
        self.cgroups.clear()
        self.networks.clear()


def leftovers(
    runner: CommandRunner | None = None, cgroup_root: Path = CGROUP_ROOT, tag: RunTag | None = None
) -> list[str]:
    """Every testbed namespace, link and cgroup on this host (of `tag` only, when given), as `kind:name`."""
    run = runner or SystemRunner()
    found = [f"netns:{n}" for n in testbed_namespaces(run)]
    found += [f"link:{n}" for n in testbed_links(run)]
    found += [f"cgroup:{n}" for n in testbed_cgroups(cgroup_root)]
    return [item for item in found if tag is None or tag.owns(item.split(":", 1)[1])]


def cleanup_stale(
    runner: CommandRunner | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    stale: Callable[[RunTag], bool] = lambda tag: not tag.alive(),
) -> list[str]:
    """Remove the resources of every run for which `stale(tag)` holds (default: its owner process is gone);
    returns what was removed (`kind:name`). Runs that are still alive (another benchmark) are left alone."""
    run = runner or SystemRunner()
    removed: list[str] = []

    def is_stale(name: str) -> bool:
        tag = RunTag.parse(name)
        return tag is not None and stale(tag)

    for netns in testbed_namespaces(run):
        if is_stale(netns):
            remove_netns(run, netns)
            removed.append(f"netns:{netns}")
    for name in testbed_cgroups(cgroup_root):
        if is_stale(name):
            try:
                CpuCgroup(name, cgroup_root).remove()
                removed.append(f"cgroup:{name}")
            except TestbedError as error:
                log.error("stale cgroup: %s", error)
    for link in testbed_links(run):
        if is_stale(link):
            run(["ip", "link", "del", link], check=False)
            removed.append(f"link:{link}")
    return removed
