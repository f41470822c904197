r"""The mix testbed: one machine's CPUs and network made into nodes of different compute and links.

`afd bench mix` (benchmarks/mix.py) brings up one cluster per mix on this testbed. Every node is an ordinary
`afd node router|attn|ffn` process, started the way `afd up` starts it (orchestration/local_cluster.py), but
wrapped so that the operating system gives it the mix's hardware:

- **compute**: each node gets a cgroup v1 `cpu` group whose CFS quota (`cpu.cfs_quota_us` over
  `cpu.cfs_period_us`) is the node's pool's CPU limit in cores, the limit a Kubernetes `resources.limits.cpu`
  sets; the same node also gets a `cpuacct` group, whose `cpuacct.usage` is the node's CPU time (its busy
  time, measured by the kernel); and its torch thread count (`--threads`).
- **links**: each attention and FFN node lives in its own network namespace, joined to a bridge in the root
  namespace by a veth pair whose two ends carry a `tc tbf` qdisc at the mix's link rate (egress of each end:
  the node's sending and its receiving direction are each capped, per node, as a NIC is).

Topology (one run; `T` is the run's tag, `afdm<owner pid in hex>x`, see names.py)::

    root namespace                                  namespace T<attn-0>      namespace T<ffn-0>
    +-----------------------------------------+     +------------------+     +------------------+
    | router (binds 10.213.N.1)  bridge Tbr   |     |  attn-0          |     |  ffn-0           |
    | bench client --------> 10.213.N.1/24 ---+--veth T0h==T0n 10.213.N.2  |  |                  |
    |                                   \-----+--veth T1h==T1n-------------+--+ 10.213.N.3       |
    +-----------------------------------------+     +------------------+     +------------------+

The router stays in the root namespace on the bridge's address: the benchmark client reaches it directly and
every node reaches it through its own (capped) veth; node-to-node data (attention <-> FFN) crosses two capped
veths through the bridge, which is what a switch between two NICs does. The router is in cgroups too (no
quota) for its CPU time. Only the gRPC data plane crosses the link: shm would bypass it (`/dev/shm` is shared
across network namespaces), so mixes run on grpc.

Every resource carries the run's tag in its name; `Testbed.close()` removes them (processes first, then
namespaces, links and cgroups) and runs from `finally` and from `atexit`, and `cleanup_stale()` removes what a
killed earlier run left behind (any tag whose owner process is gone).
"""

from orchestration.testbed.cgroups import CpuCgroup, cgroup_preflight
from orchestration.testbed.commands import CommandRunner, SystemRunner, TestbedError
from orchestration.testbed.names import GLOBAL_PREFIX, RunTag
from orchestration.testbed.netns import NodeNetwork, TestbedNetwork
from orchestration.testbed.testbed import NodeLimits, Testbed, cleanup_stale, leftovers

__all__ = [
    "GLOBAL_PREFIX",
    "CommandRunner",
    "CpuCgroup",
    "NodeLimits",
    "NodeNetwork",
    "RunTag",
    "SystemRunner",
    "Testbed",
    "TestbedError",
    "TestbedNetwork",
    "cgroup_preflight",
    "cleanup_stale",
    "leftovers",
]
