"""`afd k8s render --plan plan.json`: the pools `afd plan` chose, applied to a cluster config.

The plan decides the hardware and the sizes: the attention pool's replicas, microbatches and accelerator, and
one FFN pool of the plan's kind (named `ffn-<kind>`, cloned from the config's first FFN pool so that its
resources, placement and environment carry over). Everything else (image, model, router, token) stays the
config's. CPU kinds get no accelerator; the nccl transport, which needs a GPU on every pool, falls back to
grpc when the plan puts a pool on CPU.
"""

from __future__ import annotations

import re

from afd.planning.plan_file import PlanFile, Pool
from orchestration.k8s.config import ClusterConfig, parse_cluster_config


def _accelerator(pool: Pool) -> dict[str, object] | None:
    if pool.k8s_resource is None:
        return None
    accelerator: dict[str, object] = {"resource": pool.k8s_resource, "count": 1}
    if pool.k8s_product is not None:
        accelerator["product"] = pool.k8s_product
    return accelerator


def pool_name(kind: str) -> str:
    """The FFN pool's name for a catalog kind: `ffn-<kind>` as a DNS label (at most 24 characters)."""
    label = re.sub(r"[^a-z0-9-]+", "-", kind.lower()).strip("-") or "kind"
    return f"ffn-{label}"[:24].rstrip("-")


def apply_plan(config: ClusterConfig, plan: PlanFile) -> ClusterConfig:
    """`config` with the plan's pools (validated again, so a plan that breaks the config is an error)."""
    data = config.model_dump(mode="json", by_alias=True)
    deployment = plan.deployment
    attention = data["attention"]
    attention.update(
        replicas=deployment.attention.count,
        microbatches=deployment.microbatches,
        accelerator=_accelerator(deployment.attention),
    )
    ffn = {
        **data["ffnPools"][0],
        "name": pool_name(deployment.ffn.kind),
        "replicas": deployment.ffn.count,
        "accelerator": _accelerator(deployment.ffn),
    }
    data["ffnPools"] = [ffn]
    if attention["transport"] == "nccl" and (attention["accelerator"] is None or ffn["accelerator"] is None):
        attention["transport"] = "grpc"
    return parse_cluster_config(data, f"cluster config with plan for {deployment.attention.kind}/{deployment.ffn.kind}")
