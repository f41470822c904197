"""`afd up`'s local cluster on the mix testbed: the same node processes, each in its cgroup and namespace.

MixCluster is LocalCluster (orchestration/local_cluster.py: the router, node ids, arguments, lifeline pipe,
process records, readiness waits, graceful stop) with one change: each process is started through the
testbed, which puts it in its pool's CPU limit and (attention and FFN nodes) its own network namespace, and
the node binds its namespace's address with its pool's thread count. The router binds the testbed bridge's
address in the root namespace (LocalClusterConfig.host), where the benchmark client reaches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

from orchestration.lifeline import LAUNCHER_FD_ENV
from orchestration.local_cluster import LocalCluster, NodeHandle
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

    def _spawn(self, node_id: str, role: str, args: list[str]) -> NodeHandle:
        testbed = self.testbed
        assert testbed is not None, "MixCluster needs a started testbed"
        limits = self.limits.get(role)
        address = testbed.add_node(node_id, limits, netns=role != "router")
        args = _replace_option(args, "--host", address)
        if limits is not None and role != "router":
            args = _replace_option(args, "--threads", str(limits.threads))
        command = testbed.wrap(node_id, [sys.executable, "-m", "orchestration.cli", "node", role, *args])
        log_path = self.workdir / f"{node_id}.log"
        if self._lifeline is None:
            self._lifeline = os.pipe()  # both ends close-on-exec: only pass_fds hands the read end on
        read_end = self._lifeline[0]
        env = {**os.environ, LAUNCHER_FD_ENV: str(read_end)}
        with open(log_path, "wb") as out:
            # as LocalCluster: a session of its own, tied to the launcher by the lifeline pipe
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(read_end,), env=env
            )
        handle = NodeHandle(node_id, role, process, log_path)
        self._record(extra=[handle])
        return handle
