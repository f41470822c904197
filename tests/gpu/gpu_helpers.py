"""What the tests in tests/gpu share: the skip without CUDA (with the reason), engines on given devices, and a
greedy reference of transformers on a given device that also reports how close each step's top two were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool
from tests.checkpoints import reference_model
from tests.engines import uneven_weights

CUDA_REASON = (
    None
    if torch.cuda.is_available()
    else f"needs a CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees none"
)
requires_cuda = [pytest.mark.gpu, pytest.mark.skipif(CUDA_REASON is not None, reason=CUDA_REASON or "")]
"""pytestmark of every module here: marked gpu, skipped with the reason where torch sees no CUDA device."""

PROMPTS = [
    [7],
    [3, 14, 15, 92, 65],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
]
"""The prompts of tests/unit/test_engine_equivalence.py (the CPU suite's check against transformers)."""
NEW_TOKENS = 10


def engine_on(
    directory: Path, attn_device: str, ffn_device: str, dtype: str = "float32", shards: int = 2
) -> AttentionEngine:
    """One attention half on `attn_device` and `shards` uneven FFN shards on `ffn_device`, in this process."""
    placement, transport = local_ffn_pool(
        directory, shards, dtype, uneven_weights(shards), device=ffn_device, attention_device=attn_device
    )
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype=dtype, device=attn_device)  # type: ignore[arg-type]
    return AttentionEngine.load(directory, transport, placement, config)


def reference_on(directory: Path, device: str, dtype: torch.dtype) -> Any:
    """The checkpoint's transformers model (the CPU suite's reference) on `device` in `dtype`."""
    return reference_model(directory).to(device=device, dtype=dtype)


@torch.no_grad()
def reference_greedy(model: Any, prompt: list[int], new_tokens: int, device: str) -> tuple[list[int], list[float]]:
    """Greedy tokens of `model`, recomputing the whole sequence each step (no cache: nothing to get wrong), and
    per step the margin between its top two logits (how near a tie the choice was)."""
    ids = torch.tensor([prompt], device=device)
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(new_tokens):
        logits = model(ids).logits[0, -1].float()
        top = logits.topk(2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, margins
