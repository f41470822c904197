"""Paged KV cache: a pool of fixed-size blocks, per-request block tables, and the cache tensors.

The scheduler talks to `KVCacheManager` only through request ids and token counts (allocate, free,
usage); it never sees blocks. Allocation is all-or-nothing, so a request that cannot grow is left
untouched for the scheduler to wait or preempt.
"""

from __future__ import annotations

from collections import deque

import torch

from afd.errors import ConfigError
from attn_nodes.linear_attention import LinearStateStore


class BlockPool:
    """Free list of block ids."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) if the pool has fewer."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCacheManager:
    """Block tables of the running requests, and their linear-attention state slots when the model has any."""

    def __init__(self, num_blocks: int, block_size: int, states: LinearStateStore | None = None) -> None:
        """`states`: the recurrent states of lightning-attention layers (MiniMax); a request then holds one slot
        beside its blocks, taken by its first `allocate` and freed by `free`, so finish, abort and preemption
        return it with the blocks."""
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self.states = states

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens of the request in total; False (nothing changed) if full."""
        table = self._tables.setdefault(request_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        new_state = self.states is not None and self.states.slot(request_id) < 0
        if missing <= 0 and not new_state:
            return True
        if new_state and self.states is not None and self.states.num_free == 0:
            if not table:
                del self._tables[request_id]
            return False
        blocks = self.pool.take(max(missing, 0))
        if blocks is None:
            if not table:
                del self._tables[request_id]
            return False
        table.extend(blocks)
        if new_state and self.states is not None:
            self.states.take(request_id)
        return True

    def free(self, request_id: str) -> None:
        self.pool.give_back(self._tables.pop(request_id, []))
        if self.states is not None:
            self.states.free(request_id)

    def state_slot(self, request_id: str) -> int:
        """The request's linear-attention state slot, or -1 (no slot, or the model has no lightning layers)."""
        return -1 if self.states is None else self.states.slot(request_id)

    @property
    def num_free_state_slots(self) -> int:
        """Linear-attention state slots free (0 when the model has none)."""
        return 0 if self.states is None else self.states.num_free

    def block_ids(self, request_id: str) -> list[int]:
        return self._tables[request_id]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks


def allocate_cache_tensors(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    entry_width: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One `[num_blocks * block_size, entry_width]` tensor per layer, on `device`."""
    return [torch.zeros(num_blocks * block_size, entry_width, dtype=dtype, device=device) for _ in range(num_layers)]


def blocks_for_budget(gib: float, num_layers: int, block_size: int, entry_width: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `gib` GiB."""
    per_block = num_layers * block_size * entry_width * torch.empty((), dtype=dtype).element_size()
    blocks = int(gib * 2**30) // per_block
    if blocks < 1:
        raise ConfigError(f"{gib} GiB of KV cache holds no block of {per_block} bytes")
    return blocks
