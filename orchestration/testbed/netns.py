"""Nodes in their own network namespaces, joined to a bridge by veth pairs capped with `tc tbf`.

See the package docstring for the topology. Addresses: the bridge holds 10.213.N.1/24 (N: the first /24 of
10.213.0.0/16 no interface of this host uses), node i holds 10.213.N.(i + 2). The cap is a token bucket on the
egress of both ends of a node's veth: what the node sends and what it receives are each limited to the rate,
per node, like a NIC of that speed (`netem` delay is not available on every kernel; tbf is). The bucket holds
one segment and segments are one MTU, so each message takes its bytes / rate on the link, as on a wire.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestration.testbed.commands import CommandRunner, TestbedError
from orchestration.testbed.names import GLOBAL_PREFIX

SUBNET_PREFIX = "10.213"
"""The /16 the testbed takes its /24 from."""
MAX_NODES = 200


SEGMENT_BYTES = 1500
"""Largest segment the stack hands a capped veth (`gso_max_size`): one MTU, as on a wire."""
TBF_BURST_BYTES = 1600
"""Token bucket of a capped link: one segment. A bigger bucket would let a whole small message through at
once, and the cap would then limit only the average rate, not each message's time on the link."""


def tbf_args(rate_mbit: float) -> list[str]:
    """`tc qdisc ... tbf` arguments for a cap of `rate_mbit` (1e6 bit/s), each message paced at the rate.

    The bucket holds one segment (the veth's segmentation offload is limited to SEGMENT_BYTES, so no packet
    is larger than the bucket); at high rates it holds 20 µs of traffic, so the qdisc's timer need not fire
    for every packet. The queue may hold 200 ms of traffic before tbf drops (TCP then
    backs off, as behind a real slow link).
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(TBF_BURST_BYTES, int(rate_bytes * 20e-6))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "200ms"]


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bytes of a message a capped link passes at once (the bucket): the planner's per-message discount."""
    return int(tbf_args(rate_mbit)[4])


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    """One node's namespace, address and link."""

    netns: str
    """Network namespace name."""
    address: str
    """The node's IPv4 address (on its end of the veth)."""
    host_end: str
    """veth end attached to the bridge, in the root namespace."""
    node_end: str
    """veth end inside the namespace."""
    rate_mbit: float | None
    """Cap of each direction, 1e6 bit/s; None: uncapped."""

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec` execs it: the process keeps its pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class TestbedNetwork:
    """The bridge and node namespaces of one run."""

    __test__ = False  # not a pytest test class

    runner: CommandRunner
    tag: str
    """The run's tag; every name starts with it."""
    subnet: str = ""
    """`10.213.N`, chosen by up()."""
    nodes: dict[str, NodeNetwork] = field(default_factory=dict)
    _up: bool = False

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        """The bridge's address: where the router listens."""
        return f"{self.subnet}.1"

    def _free_subnet(self) -> str:
        addresses = self.runner(["ip", "-4", "-o", "addr", "show"])
        used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", addresses))
        for n in range(256):
            if str(n) not in used:
                return f"{SUBNET_PREFIX}.{n}"
        raise TestbedError(f"every /24 of {SUBNET_PREFIX}.0.0/16 is in use on this host")

    def up(self) -> None:
        self.subnet = self._free_subnet()
        run = self.runner
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._up = True
        run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def add_node(self, node_id: str, rate_mbit: float | None) -> NodeNetwork:
        """A namespace for `node_id` with its capped veth to the bridge."""
        if not self._up:
            raise TestbedError("TestbedNetwork.add_node before up()")
        if len(self.nodes) >= MAX_NODES:
            raise TestbedError(f"the testbed holds at most {MAX_NODES} nodes")
        index = len(self.nodes)
        node = NodeNetwork(
            netns=f"{self.tag}{node_id}",
            address=f"{self.subnet}.{index + 2}",
            host_end=f"{self.tag}{index}h",
            node_end=f"{self.tag}{index}n",
            rate_mbit=rate_mbit,
        )
        self.nodes[node_id] = node  # recorded first: close() removes what a failed step half made
        run, ns = self.runner, node.netns
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", node.host_end, "type", "veth", "peer", "name", node.node_end])
        run(["ip", "link", "set", node.node_end, "netns", ns])
        run(["ip", "link", "set", node.host_end, "master", self.bridge])
        run(["ip", "link", "set", node.host_end, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{node.address}/24", "dev", node.node_end])
        run(["ip", "-n", ns, "link", "set", node.node_end, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if rate_mbit is not None:
            run(["ip", "link", "set", "dev", node.host_end, "gso_max_size", str(SEGMENT_BYTES)])
            run(["ip", "-n", ns, "link", "set", "dev", node.node_end, "gso_max_size", str(SEGMENT_BYTES)])
            try:
                run(["tc", "qdisc", "add", "dev", node.host_end, "root", *tbf_args(rate_mbit)])
                run(["tc", "-n", ns, "qdisc", "add", "dev", node.node_end, "root", *tbf_args(rate_mbit)])
            except TestbedError as error:
                raise TestbedError(f"cannot cap the link with tc tbf (kernel module sch_tbf?): {error}") from None
        return node

    def close(self) -> None:
        """Remove every namespace, veth and the bridge of this run (processes in a namespace are killed)."""
        for node in self.nodes.values():
            remove_netns(self.runner, node.netns)
            self.runner(["ip", "link", "del", node.host_end], check=False)  # gone with its peer's namespace
        self.nodes.clear()
        if self._up:
            self.runner(["ip", "link", "del", self.bridge], check=False)
            self._up = False


def remove_netns(runner: CommandRunner, netns: str) -> None:
    """Kill the processes of `netns` (testbed nodes) and delete it."""
    for pid in runner(["ip", "netns", "pids", netns], check=False).split():
        runner(["kill", "-9", pid], check=False)
    runner(["ip", "netns", "del", netns], check=False)


def testbed_namespaces(runner: CommandRunner) -> list[str]:
    """Every namespace of any run (by the global prefix)."""
    lines = runner(["ip", "netns", "list"], check=False).splitlines()
    return sorted({line.split()[0] for line in lines if line.strip() and line.split()[0].startswith(GLOBAL_PREFIX)})


def testbed_links(runner: CommandRunner) -> list[str]:
    """Every interface of any run in the root namespace (bridges and veth ends)."""
    names = set()
    for line in runner(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@", 1)[0]
            if name.startswith(GLOBAL_PREFIX):
                names.add(name)
    return sorted(names)
