"""One FFN node's share of every layer: its routed experts and its slices of dense / shared MLPs.

The shard reads only those tensors from the checkpoint (dense and shared slices are read as row/column
slices, never whole), and answers FfnRequests with partial sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from afd.checkpoint import CheckpointReader
from afd.errors import ConfigError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.tensor_names import GatedMlpNames, TensorNames
from ffn_nodes.experts import ClampedSwigluExperts, MlpSlice, StackedExperts
from ffn_nodes.limited_swiglu import LimitedMlpSlice, LimitedSwigluExperts


@dataclass(slots=True)
class LayerShard:
    """What this node computes for one layer."""

    experts: StackedExperts | ClampedSwigluExperts | LimitedSwigluExperts | None = None
    """Routed experts held here (MoE layers)."""
    shared: MlpSlice | None = None
    """Slice of the shared expert(s) (MoE layers that have them)."""
    dense: MlpSlice | None = None
    """Slice of the dense MLP (dense layers)."""


class FfnShard:
    """Computes partial sums for the experts and MLP slices that the placement gives node `node_id`."""

    def __init__(
        self,
        spec: ModelSpec,
        placement: ExpertPlacement,
        node_id: str,
        layers: list[LayerShard],
        device: torch.device | None = None,
    ):
        """`device`: where the weights are and the partial sums are computed; None: the weights' device (the
        CPU for a shard that holds nothing)."""
        self.spec = spec
        self.placement = placement
        self.node_id = node_id
        self.layers = layers
        weights = [
            part.gate_up for layer in layers for part in (layer.experts, layer.shared, layer.dense) if part is not None
        ]
        self.dtype = weights[0].dtype if weights else torch.float32
        self.device: torch.device = weights[0].device if weights else (device or torch.device("cpu"))
        """The compute device: requests are moved here, partial sums are returned here."""

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        placement: ExpertPlacement,
        node_id: str,
        dtype: torch.dtype | None = None,
        spec: ModelSpec | None = None,
        reader: CheckpointReader | None = None,
        device: torch.device | str | None = None,
    ) -> FfnShard:
        """Node `node_id`'s share of `placement`, read from `model_dir` (or through `reader`, whose dtype and
        device then apply) straight onto `device` (None: the reader's, else the CPU; `meta` builds it without
        storage, for tests and dry runs)."""
        spec = spec or ModelSpec.from_pretrained(model_dir)
        if spec.num_experts != placement.num_experts:
            raise ConfigError(f"placement covers {placement.num_experts} experts, the model has {spec.num_experts}")
        wanted = torch.device(device) if device is not None else None
        if reader is None:
            reader = CheckpointReader(model_dir, dtype=dtype, device=wanted)
        target = reader.device or torch.device("cpu")
        if wanted is not None and (
            target.type != wanted.type or (wanted.index is not None and target.index not in (None, wanted.index))
        ):
            raise ConfigError(f"FfnShard.load: device {wanted} differs from the reader's ({target})")
        node = placement.index(node_id)
        names = TensorNames(spec)
        layers = []
        for layer, layer_spec in enumerate(spec.layers):
            shard = LayerShard()
            if layer_spec.moe is not None:
                moe = layer_spec.moe
                local = placement.experts[node]
                if local:
                    shard.experts = _load_experts(reader, names, spec, layer, local, moe.intermediate_size)
                if moe.shared_intermediate_size:
                    bounds = placement.slice_bounds(node, moe.shared_intermediate_size)
                    shard.shared = _load_slice(
                        reader,
                        names.shared_expert(layer),
                        spec,
                        bounds,
                        moe.shared_intermediate_size,
                        layer_spec.mlp_swiglu_limit,
                    )
            else:
                size = layer_spec.dense_intermediate_size
                shard.dense = _load_slice(
                    reader,
                    names.dense_mlp(layer),
                    spec,
                    placement.slice_bounds(node, size),
                    size,
                    layer_spec.mlp_swiglu_limit,
                )
            layers.append(shard)
        return cls(spec, placement, node_id, layers, target)

    @property
    def num_local_experts(self) -> int:
        """Routed experts this node holds per MoE layer under this shard's placement."""
        return len(self.placement.experts[self.placement.index(self.node_id)])

    def expert_token_counts(self) -> list[int]:
        """Token-expert pairs computed per local expert since load, summed over layers.

        The one place they are counted is StackedExperts.forward (the batch thread); this only reads
        them. Each count only grows, so a reader takes differences between two readings, and a reading
        that races an add merely moves that add into the next difference.
        """
        totals = [0] * self.num_local_experts
        for layer in self.layers:
            if layer.experts is not None:
                # a copy; on an accelerator, the one read of the device counters (see ExpertLoad)
                for expert, count in enumerate(layer.experts.expert_tokens):
                    totals[expert] += count
        return totals

    def compute(self, request: FfnRequest) -> torch.Tensor:
        """Partial sum `[num_tokens, hidden_size]` (hidden dtype, on the shard's device) of this node's share of
        `request.layer`. Request tensors elsewhere (the wire decodes to the CPU) are moved here first, once."""
        if not 0 <= request.layer < len(self.layers):
            raise ValueError(f"layer {request.layer} out of range [0, {len(self.layers)})")
        shard = self.layers[request.layer]
        device = self.device
        hidden = _on(request.hidden, device)
        out = torch.zeros_like(hidden)
        if shard.experts is not None and request.expert_ids is not None:
            assert request.expert_weights is not None, "expert_ids without expert_weights"
            ids, weights = _on(request.expert_ids, device), _on(request.expert_weights, device)
            shard.experts.forward(hidden, ids, weights, out)
        if shard.shared is not None:
            shared = shard.shared.forward(hidden)
            if request.shared_scale is not None:
                shared = shared * _on(request.shared_scale, device).to(shared.dtype).unsqueeze(1)
            out += shared
        if shard.dense is not None:
            out += shard.dense.forward(hidden)
        return out


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: itself when already there; from pinned host memory without blocking the host (the
    copy is ordered before the compute on the same stream, and torch's pinned allocator keeps the buffer alive)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and tensor.is_pinned())


def _load_experts(
    reader: CheckpointReader,
    names: TensorNames,
    spec: ModelSpec,
    layer: int,
    ids: tuple[int, ...],
    inter: int,
) -> StackedExperts | ClampedSwigluExperts | LimitedSwigluExperts:
    """The experts `ids` of `layer`, reading only their tensors (only their rows of fused tensors)."""
    if names.fused_experts(layer) is not None:
        return load_fused_experts(reader, names, spec, layer, ids)
    if names.stacked_experts(layer) is not None:
        return load_stacked_experts(reader, names, spec, layer, ids)
    hidden = spec.hidden_size
    gate_up, down = [], []
    for expert in ids:
        n = names.expert(layer, expert)
        gate_up.append(torch.cat((reader.get(n.gate, (inter, hidden)), reader.get(n.up, (inter, hidden)))))
        down.append(reader.get(n.down, (hidden, inter)))
    return StackedExperts(torch.stack(gate_up), torch.stack(down))


def load_fused_experts(
    reader: CheckpointReader, names: TensorNames, spec: ModelSpec, layer: int, ids: tuple[int, ...]
) -> ClampedSwigluExperts:
    """gpt-oss experts `ids` of `layer` from the stacked tensors (see FusedExpertNames), turned into the
    layout the compute uses: `[experts, 2 * intermediate, hidden]` with the gate rows first, down `[experts,
    hidden, intermediate]`."""
    fused, moe = names.fused_experts(layer), spec.moe(layer)
    assert fused is not None and moe is not None
    hidden, inter, total = spec.hidden_size, moe.intermediate_size, moe.num_experts
    gate_up = reader.get_rows(fused.gate_up, ids, (total, hidden, 2 * inter))
    gate_up_bias = reader.get_rows(fused.gate_up_bias, ids, (total, 2 * inter))
    down = reader.get_rows(fused.down, ids, (total, inter, hidden))
    down_bias = reader.get_rows(fused.down_bias, ids, (total, hidden))
    # Columns alternate gate, up, gate, up, ...: de-interleave, and store rows as [out, in] for `linear`.
    gate_up = torch.cat((gate_up[..., 0::2], gate_up[..., 1::2]), dim=-1).transpose(1, 2).contiguous()
    gate_up_bias = torch.cat((gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]), dim=-1).contiguous()
    down = down.transpose(1, 2).contiguous()
    return ClampedSwigluExperts(gate_up, gate_up_bias, down, down_bias, moe.swiglu_alpha, moe.swiglu_limit)


def load_stacked_experts(
    reader: CheckpointReader, names: TensorNames, spec: ModelSpec, layer: int, ids: tuple[int, ...]
) -> StackedExperts | LimitedSwigluExperts:
    """Step-3.5 experts `ids` of `layer`: only their rows of the per-projection stacked tensors (see
    TensorNames.stacked_experts), which already have the compute's `[out, in]` rows."""
    stacked, moe = names.stacked_experts(layer), spec.moe(layer)
    assert stacked is not None and moe is not None
    hidden, inter, total = spec.hidden_size, moe.intermediate_size, moe.num_experts
    gate = reader.get_rows(stacked.gate, ids, (total, inter, hidden))
    up = reader.get_rows(stacked.up, ids, (total, inter, hidden))
    down = reader.get_rows(stacked.down, ids, (total, hidden, inter))
    gate_up = torch.cat((gate, up), dim=1)
    if moe.activation == "limited_swiglu":
        return LimitedSwigluExperts(gate_up, down, moe.swiglu_limit)
    return StackedExperts(gate_up, down)


def _load_slice(
    reader: CheckpointReader,
    n: GatedMlpNames,
    spec: ModelSpec,
    bounds: tuple[int, int],
    size: int,
    limit: float = 0.0,
) -> MlpSlice | None:
    """Columns [start, end) of a dense MLP / shared expert; `limit` > 0 bounds its SwiGLU (Step-3.5)."""
    start, end = bounds
    if end <= start:
        return None
    hidden = spec.hidden_size
    gate = reader.get_slice(n.gate, 0, start, end, full_shape=(size, hidden))
    up = reader.get_slice(n.up, 0, start, end, full_shape=(size, hidden))
    down = reader.get_slice(n.down, 1, start, end, full_shape=(hidden, size))
    if limit:
        return LimitedMlpSlice(torch.cat((gate, up)), down, limit)
    return MlpSlice(torch.cat((gate, up)), down)
