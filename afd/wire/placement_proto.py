"""ExpertPlacement <-> its protobuf form (afd.v1.Placement), with each FFN node's address."""

from __future__ import annotations

from collections.abc import Mapping

from afd.errors import ConfigError
from afd.placement import ExpertPlacement
from afd.wire.generated import afd_cluster_pb2 as pb


def placement_to_proto(placement: ExpertPlacement, addresses: Mapping[str, str] | None = None) -> pb.Placement:
    """The wire form of `placement`; `addresses` maps node id -> "host:port" (empty where unknown)."""
    addresses = addresses or {}
    return pb.Placement(
        version=placement.version,
        num_experts=placement.num_experts,
        nodes=[
            pb.PlacementEntry(node_id=node, address=addresses.get(node, ""), experts=list(ids), mlp_share=share)
            for node, ids, share in zip(placement.nodes, placement.experts, placement.mlp_shares, strict=True)
        ],
    )


def placement_from_proto(message: pb.Placement) -> tuple[ExpertPlacement, dict[str, str]]:
    """The placement and the node addresses it carries; raises ConfigError when it is inconsistent."""
    if not message.nodes:
        raise ConfigError("the placement names no FFN nodes")
    placement = ExpertPlacement(
        num_experts=message.num_experts,
        nodes=tuple(entry.node_id for entry in message.nodes),
        experts=tuple(tuple(entry.experts) for entry in message.nodes),
        mlp_shares=tuple(entry.mlp_share for entry in message.nodes),
        version=message.version,
    )
    return placement, {entry.node_id: entry.address for entry in message.nodes if entry.address}
