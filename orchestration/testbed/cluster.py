"""`afd up`'s local cluster on the mix testbed: the same node processes, each in its cgroup and namespace.

MixCluster is LocalCluster (orchestration/local_cluster.py: the router, node ids, arguments, lifeline pipe,
process records, readiness waits, graceful stop) with one change: each process is started through the
testbed, which puts it in its pool's CPU limit and (attention and FFN nodes) its own network namespace, and
the node binds its namespace's address with its pool's thread count. The router binds the testbed bridge's
address in the root namespace (LocalClusterConfig.host), where the benchmark client reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestration.local_cluster import LocalCluster
from orchestration.testbed.testbed import NodeLimits, Testbed

ROLE_OF_PROCESS = {"attn": "attention", "ffn": "ffn", "router": "router"}


def _replace_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option`'s value set to `value` (appended when absent)."""
    out = list(args)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return out


@dataclass
class MixCluster(LocalCluster):
    """A LocalCluster whose processes run on `testbed` with their pool's `limits` (keys: attn, ffn)."""

    testbed: Testbed | None = None
    """Started testbed (its bridge address must be config.host)."""
    limits: dict[str, NodeLimits] = field(default_factory=dict)
    """Process role (attn, ffn) -> CPU quota and threads of every node of that pool."""

    def _node_command(self, node_id: str, role: str, args: list[str]) -> list[str]:
        testbed = self.testbed
        assert testbed is not None, "MixCluster needs a started testbed"
        limits = self.limits.get(role)
        address = testbed.add_node(node_id, limits, netns=role != "router")
        args = _replace_option(args, "--host", address)
        if limits is not None and role != "router":
            args = _replace_option(args, "--threads", str(limits.threads))
        return testbed.wrap(node_id, super()._node_command(node_id, role, args))
