"""Short start-up measurements for the capacity profile a node reports to the router.

The router routes requests and places experts in proportion to these costs, so they are measured on the node's
own hardware with its own model, not looked up in a table.
"""

from __future__ import annotations

import time

import torch

from afd.devices import DeviceInfo, synchronize
from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk
from attn_nodes.model import AttentionHalfModel

CALIBRATION_CONTEXT = 128
CALIBRATION_BATCH = 8


def device_description(device: torch.device) -> tuple[str, int, int]:
    """(device name, memory bytes, count) of the compute device (afd.devices.DeviceInfo)."""
    info = DeviceInfo.of(device)
    return info.name, info.memory_bytes, 1


@torch.inference_mode()
def attention_us_per_token(model: AttentionHalfModel, repeats: int = 3) -> float:
    """Microseconds per token per layer of the attention half, for a decode batch at CALIBRATION_CONTEXT."""
    spec = model.spec
    block = 16
    blocks_per_seq = -(-(CALIBRATION_CONTEXT + 1) // block)
    device = model.device
    cache = torch.zeros(
        CALIBRATION_BATCH * blocks_per_seq * block, spec.kv_entry_width, dtype=model.dtype, device=device
    )
    chunks = [
        SequenceChunk(list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), CALIBRATION_CONTEXT, 1, i)
        for i in range(CALIBRATION_BATCH)
    ]
    # Lightning-attention layers (MiniMax) read a recurrent state per sequence (slot i) instead of the cache.
    states = torch.zeros(
        CALIBRATION_BATCH, spec.num_heads, spec.head_dim, spec.head_dim, dtype=model.dtype, device=device
    )
    meta, _ = AttentionMetadata.build(chunks, block).to_device(device)
    tables = model.rope.tables(meta.positions)
    hidden = torch.randn(CALIBRATION_BATCH, spec.hidden_size, dtype=model.dtype, device=device) * 0.1
    layers = list(range(spec.num_layers))
    best = float("inf")
    for _ in range(repeats):
        residual = hidden.clone()
        synchronize(device)
        start = time.perf_counter()
        for layer in layers:
            model.attention_half(layer, residual, meta, states if spec.is_linear_attention(layer) else cache, tables)
        synchronize(device)  # an accelerator only queued the work
        best = min(best, time.perf_counter() - start)
    return best * 1e6 / (CALIBRATION_BATCH * len(layers))
