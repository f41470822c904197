"""The launcher `afd bench mix` runs each mix with: a fresh testbed and a MixCluster on it, torn down on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.mix import MixSpec, RunningMix
from benchmarks.serve_cluster import settled_exchange_totals
from orchestration.local_cluster import LocalClusterConfig
from orchestration.testbed.cluster import MixCluster
from orchestration.testbed.netns import tbf_burst_bytes
from orchestration.testbed.testbed import NodeLimits, Testbed


@contextmanager
def launch_mix(model_dir: Path, spec: MixSpec) -> Iterator[RunningMix]:
    """Bring `spec` up on this machine's testbed; every process, namespace, link and cgroup is gone on exit."""
    testbed = Testbed(link_mbit=spec.link_mbit)
    try:
        testbed.start()
        config = LocalClusterConfig(
            model=model_dir,
            attn=spec.attention.count,
            ffn=spec.ffn.count,
            transport="grpc",  # the data plane that crosses the capped links (shm would go around them)
            microbatches=str(spec.microbatches),
            wire_dtype=spec.wire_dtype,
            host=testbed.router_host,
            http_port=0,
        )
        limits = {
            "attn": NodeLimits(spec.attention.cpu, spec.attention.threads),
            "ffn": NodeLimits(spec.ffn.cpu, spec.ffn.threads),
        }
        cluster = MixCluster(config, testbed=testbed, limits=limits)
        try:
            cluster.start()
            burst = tbf_burst_bytes(spec.link_mbit) if spec.link_mbit is not None else 0
            base_url = cluster.base_url
            yield RunningMix(
                base_url,
                cluster.cluster,
                testbed.cpu_usage_ns,
                testbed.throttling,
                burst,
                exchange_totals=lambda previous: settled_exchange_totals(base_url, previous),
            )
        finally:
            cluster.stop()
            cluster.remove_workdir()
    finally:
        testbed.close()
