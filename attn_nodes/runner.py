"""One forward pass of the attention node over a batch, with the FFN halves behind a transport.

The batch is split into m microbatches. Per layer, every microbatch computes its attention half and
dispatches to the FFN nodes; then each is combined in turn. With an asynchronous transport the FFN
nodes work on microbatch i while the attention node computes microbatch i+1 (ping-pong).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afd.transport.base import FfnTransport
from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk
from attn_nodes.dispatch import FfnDispatcher
from attn_nodes.model import AttentionHalfModel


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
                in_flight.append((dispatch, self.transport.dispatch(dispatch.requests)))
            for mb_index, (dispatch, pending) in enumerate(in_flight):
                partials = self.transport.combine(pending)
                self.dispatcher.accumulate(residuals[mb_index], dispatch, partials)
        return [model.logits(residuals[i][mb.logits_rows]) for i, mb in enumerate(microbatches)]
