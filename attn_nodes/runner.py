"""One forward pass of the attention node over a batch, with the FFN halves behind a transport.

The batch is split into m microbatches. Per layer, every microbatch computes its attention half and
dispatches to the FFN nodes; then each is combined in turn. With an asynchronous transport the FFN
nodes work on microbatch i while the attention node computes microbatch i+1 (ping-pong).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afd.transport.base import FfnTransport
from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk
from attn_nodes.dispatch import FfnDispatcher
from attn_nodes.model import AttentionHalfModel


class TransferStats:
    """Per-layer attention->FFN->attention exchanges since the last `take()` (for heartbeats/metrics)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._reset()

    def _reset(self) -> None:
        layers = self.num_layers
        self.round_trips, self.seconds = [0] * layers, [0.0] * layers
        self.bytes_sent, self.bytes_received = [0] * layers, [0] * layers

    def record(self, layer: int, seconds: float, sent: int, received: int) -> None:
        self.round_trips[layer] += 1
        self.seconds[layer] += seconds
        self.bytes_sent[layer] += sent
        self.bytes_received[layer] += received

    def take(self) -> list[tuple[int, int, float, int, int]]:
        """(layer, round_trips, seconds, bytes_sent, bytes_received) of layers with traffic; then reset."""
        rows = [
            (layer, self.round_trips[layer], self.seconds[layer], self.bytes_sent[layer], self.bytes_received[layer])
            for layer in range(self.num_layers)
            if self.round_trips[layer]
        ]
        self._reset()
        return rows


def _payload_bytes(requests: dict) -> int:
    total = 0
    for request in requests.values():
        for tensor in (request.hidden, request.expert_ids, request.expert_weights, request.shared_scale):
            if tensor is not None:
                total += tensor.nbytes
    return total


@dataclass(slots=True)
class Microbatch:
    token_ids: torch.Tensor
    """`[num_tokens] int64`."""
    meta: AttentionMetadata
    logits_rows: torch.Tensor
    """`[num_sampled] int64` flat token rows whose logits are needed."""


class ModelRunner:
    def __init__(
        self,
        model: AttentionHalfModel,
        cache: list[torch.Tensor],
        block_size: int,
        transport: FfnTransport,
        dispatcher: FfnDispatcher,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.transport = transport
        self.dispatcher = dispatcher
        self.transfers = TransferStats(model.spec.num_layers)

    def prepare(
        self, chunks: Sequence[SequenceChunk], token_ids: Sequence[list[int]], wants_logits: Sequence[bool]
    ) -> Microbatch:
        meta = AttentionMetadata.build(chunks, self.block_size)
        flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
        rows = meta.last_token_index[torch.tensor(wants_logits, dtype=torch.bool)]
        return Microbatch(flat, meta, rows)

    @torch.inference_mode()
    def forward(self, microbatches: Sequence[Microbatch]) -> list[torch.Tensor]:
        """Logits `[num_sampled, vocab] float32` per microbatch."""
        model = self.model
        residuals = [model.embed(mb.token_ids) for mb in microbatches]
        tables = [model.rope.tables(mb.meta.positions) for mb in microbatches]
        for layer in range(model.spec.num_layers):
            in_flight = []
            for mb_index, mb in enumerate(microbatches):
                hidden, routing = model.attention_half(
                    layer, residuals[mb_index], mb.meta, self.cache[layer], tables[mb_index]
                )
                dispatch = self.dispatcher.build(layer, hidden, routing, mb_index)
                sent_at = time.perf_counter()
                in_flight.append((dispatch, self.transport.dispatch(dispatch.requests), sent_at))
            for mb_index, (dispatch, pending, sent_at) in enumerate(in_flight):
                partials = self.transport.combine(pending)
                received = sum(p.nbytes for p in partials.values())
                self.transfers.record(layer, time.perf_counter() - sent_at, _payload_bytes(dispatch.requests), received)
                self.dispatcher.accumulate(residuals[mb_index], dispatch, partials)
        return [model.logits(residuals[i][mb.logits_rows]) for i, mb in enumerate(microbatches)]
