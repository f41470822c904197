"""One forward pass of the attention node over a batch, with the FFN halves behind a transport.

The batch is split into m microbatches that advance through the layers as a wavefront (MegaScale-Infer,
Step-3): microbatch i starts layer L+1 as soon as its own layer-L partial sums are in, without waiting for
the other microbatches' layer L.

Invariant kept by `ModelRunner.forward` (the order of every dispatch D(L, i) and combine C(L, i)):

    D(0, 0) D(0, 1) ... D(0, m-1)
    C(0, 0) D(1, 0)   C(0, 1) D(1, 1)   ...   C(0, m-1) D(1, m-1)
    C(1, 0) D(2, 0)   ...                                           (and so on to the last layer)

- each microbatch has exactly one exchange in flight from its first dispatch to its last combine: D(L+1, i)
  is issued right after C(L, i), after only microbatch i's own layer-(L+1) attention half;
- combines are taken round-robin in microbatch order, so while the attention node waits on (or computes
  after) C(L, i), the FFN nodes hold the other m-1 microbatches' requests (layer L for those after i,
  layer L+1 for those before i): with m >= 2 the FFN round trip of one microbatch hides behind the
  attention of the others, including the last microbatch of each layer;
- microbatches never read each other's state (disjoint sequences, so disjoint KV blocks), hence this
  order computes exactly what layer-by-layer order does and tokens do not depend on m.
With m = 1 the order is D(0) C(0) D(1) C(1) ...: plain synchronous layer-by-layer decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afd.errors import ConfigError
from afd.ffn_messages import FP8_WIRE_DTYPE, quantize_fp8
from afd.transport.base import FfnTransport, PendingCombine
from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk
from attn_nodes.dispatch import Dispatch, FfnDispatcher
from attn_nodes.model import AttentionHalfModel


def resolve_wire_dtype(name: str) -> torch.dtype | None:
    """The dtype hidden states travel in for EngineConfig.wire_dtype `name`; None for the model dtype."""
    choices: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp8": FP8_WIRE_DTYPE}
    if name not in choices:
        raise ConfigError(f"wire_dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]


class TransferStats:
    """Per-layer attention->FFN->attention exchanges since the last `take()` (for heartbeats/metrics).

    `seconds` runs from dispatch to the end of combine (both transfers, the FFN compute, and whatever the
    attention node computed meanwhile); `wait_seconds` is only the time spent blocked in combine, the part
    of the exchange the microbatch pipeline did not hide. The waits also add up in `wait_totals` (never
    reset by `take`), so a benchmark can read them without racing the heartbeat.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.wait_totals = [0.0] * num_layers
        """Seconds blocked in combine per layer since start (monotonic)."""
        self.round_trip_totals = [0] * num_layers
        """Exchanges per layer since start (monotonic)."""
        self.token_totals = [0] * num_layers
        """Tokens (microbatch rows) sent per layer since start (monotonic)."""
        self.bytes_sent_totals = [0] * num_layers
        """Bytes sent per layer since start (monotonic): with token_totals, the wire's bytes per token."""
        self._reset()

    def _reset(self) -> None:
        layers = self.num_layers
        self.round_trips, self.seconds = [0] * layers, [0.0] * layers
        self.bytes_sent, self.bytes_received = [0] * layers, [0] * layers
        self.wait_seconds = [0.0] * layers

    def record(self, layer: int, seconds: float, sent: int, received: int, wait: float = 0.0, tokens: int = 0) -> None:
        self.round_trips[layer] += 1
        self.seconds[layer] += seconds
        self.bytes_sent[layer] += sent
        self.bytes_received[layer] += received
        self.wait_seconds[layer] += wait
        self.wait_totals[layer] += wait
        self.round_trip_totals[layer] += 1
        self.token_totals[layer] += tokens
        self.bytes_sent_totals[layer] += sent

    def take(self) -> list[tuple[int, int, float, int, int, float]]:
        """(layer, round_trips, seconds, bytes_sent, bytes_received, wait_seconds) of layers with traffic; then
        reset."""
        rows = [
            (
                layer,
                self.round_trips[layer],
                self.seconds[layer],
                self.bytes_sent[layer],
                self.bytes_received[layer],
                self.wait_seconds[layer],
            )
            for layer in range(self.num_layers)
            if self.round_trips[layer]
        ]
        self._reset()
        return rows


def _payload_bytes(requests: dict) -> int:
    total = 0
    for request in requests.values():
        for tensor in (
            request.hidden,
            request.hidden_scale,
            request.expert_ids,
            request.expert_weights,
            request.shared_scale,
        ):
            if tensor is not None:
                total += tensor.nbytes
    return total


@dataclass(slots=True)
class _InFlight:
    """One microbatch's exchange with the FFN nodes for one layer, dispatched and not yet combined."""

    dispatch: Dispatch
    pending: PendingCombine
    sent_at: float
    """perf_counter() when the requests were handed to the transport."""


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
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        """wire_dtype: what hidden states travel in to the FFN nodes (float8_e4m3fn: with per-token scales);
        None keeps the model dtype."""
        self.model = model
        self.wire_dtype = None if wire_dtype == model.dtype else wire_dtype
        self.cache = cache
        self.block_size = block_size
        self.transport = transport
        self.dispatcher = dispatcher
        self.transfers = TransferStats(model.spec.num_layers)
        self.device = model.device

    def prepare(
        self,
        chunks: Sequence[SequenceChunk],
        token_ids: Sequence[list[int]],
        wants_logits: Sequence[bool],
        extra_logits_rows: Sequence[int] = (),
    ) -> Microbatch:
        """The microbatch of `chunks`, on the model's device: built on the host, moved in one copy.

        Logits are computed for the last token of each chunk that `wants_logits`, then for the flat token rows
        `extra_logits_rows` (prompt logprobs), in that order."""
        meta = AttentionMetadata.build(chunks, self.block_size)
        flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
        rows = meta.last_token_index[torch.tensor(wants_logits, dtype=torch.bool)]
        if extra_logits_rows:
            rows = torch.cat([rows, torch.tensor(list(extra_logits_rows), dtype=torch.int64)])
        meta, (flat, rows) = meta.to_device(self.device, flat, rows)
        return Microbatch(flat, meta, rows)

    @torch.inference_mode()
    def forward(self, microbatches: Sequence[Microbatch]) -> list[torch.Tensor]:
        """Logits `[num_sampled, vocab] float32` per microbatch, in the wavefront order the module states."""
        model = self.model
        residuals = [model.embed(mb.token_ids) for mb in microbatches]
        tables = [model.rope.tables(mb.meta.positions) for mb in microbatches]
        last = model.spec.num_layers - 1
        in_flight = [self._dispatch(0, i, mb, residuals[i], tables[i]) for i, mb in enumerate(microbatches)]
        for layer in range(last + 1):
            for i, mb in enumerate(microbatches):
                self._combine(layer, residuals[i], in_flight[i])
                if layer < last:
                    in_flight[i] = self._dispatch(layer + 1, i, mb, residuals[i], tables[i])
        return [model.logits(residuals[i][mb.logits_rows]) for i, mb in enumerate(microbatches)]

    def _dispatch(
        self, layer: int, index: int, mb: Microbatch, residual: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]
    ) -> _InFlight:
        """Microbatch `index`'s attention half of `layer`, then its requests to the FFN nodes (not awaited)."""
        hidden, routing = self.model.attention_half(layer, residual, mb.meta, self.cache[layer], tables)
        scale = None
        if self.wire_dtype == FP8_WIRE_DTYPE:
            hidden, scale = quantize_fp8(hidden)  # once per microbatch; each node gets its rows of both
        elif self.wire_dtype is not None:
            hidden = hidden.to(self.wire_dtype)
        dispatch = self.dispatcher.build(layer, hidden, routing, index)
        if scale is not None:
            for node, request in dispatch.requests.items():
                rows = dispatch.rows[node]
                request.hidden_scale = scale if rows is None else scale[rows]
        sent_at = time.perf_counter()
        return _InFlight(dispatch, self.transport.dispatch(dispatch.requests), sent_at)

    def _combine(self, layer: int, residual: torch.Tensor, exchange: _InFlight) -> None:
        """Wait for the partial sums of `exchange` and add them into `residual` (the microbatch's layer ends)."""
        waiting_since = time.perf_counter()
        partials = self.transport.combine(exchange.pending)
        now = time.perf_counter()
        received = sum(p.nbytes for p in partials.values())
        sent = _payload_bytes(exchange.dispatch.requests)
        tokens = residual.shape[0]
        self.transfers.record(layer, now - exchange.sent_at, sent, received, wait=now - waiting_since, tokens=tokens)
        self.dispatcher.accumulate(residual, exchange.dispatch, partials)
