"""Per-step layout of a varlen batch for paged attention, built once and shared by every layer.

A step processes a flat list of tokens from several sequences (prefill chunks and decode tokens
together). Attention pads them to `[num_seqs, max_query_len]` queries against
`[num_seqs, max_context_len]` keys gathered from the paged cache through the block tables.

The index tensors are built on the host from the scheduler's lists (tiny, and the block tables live there);
on an accelerator `to_device` then moves all of them, with the step's token ids, in one copy from one pinned
buffer and rebuilds the masks there, so no layer ever reads an index back or copies one of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SequenceChunk:
    """One sequence's part of a step: tokens [start, start + num_tokens) of its context."""

    block_ids: Sequence[int]
    """KV cache blocks of the sequence, in order."""
    start: int
    """Tokens already in the cache before this step."""
    num_tokens: int
    """Tokens computed this step."""
    state_slot: int = -1
    """Slot of the sequence's linear-attention state (KVCacheManager.state_slot); -1 when the model has none."""


@dataclass(slots=True)
class AttentionMetadata:
    """Index tensors for one (micro)batch."""

    positions: torch.Tensor
    """`[num_tokens] int64` position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """`[num_tokens] int64` cache slot each token's K/V is written to."""
    context_slots: torch.Tensor
    """`[num_seqs, max_context_len] int64` cache slots to read per sequence (padding repeats a valid slot)."""
    mask: torch.Tensor | None
    """`[num_seqs, 1, max_query_len, max_context_len] bool`, True = may attend; None when every
    sequence decodes one token and attends to all its context."""
    key_padding: torch.Tensor | None
    """`[num_seqs, 1, 1, max_context_len] bool` valid keys for the decode-only case (None if no padding)."""
    query_index: torch.Tensor | None
    """`[num_tokens] int64` row of each token in the padded `[num_seqs * max_query_len]` query layout;
    None in the decode-only case, where the flat tokens already are that layout."""
    num_seqs: int
    max_query_len: int
    last_token_index: torch.Tensor
    """`[num_seqs] int64` flat index of each sequence's last token this step (for logits)."""
    query_positions: torch.Tensor | None = None
    """`[num_seqs, max_query_len] int64` position of each padded query row (padding rows: 0)."""
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    """window -> its mask, built by the first sliding layer of the step and reused by the others."""
    state_slots: torch.Tensor | None = None
    """`[num_seqs] int64` linear-attention state slot of each sequence; None when no chunk has one."""
    seq_starts: tuple[int, ...] = ()
    """Host copy: tokens already cached per sequence (SequenceChunk.start), for code that loops per sequence."""
    query_lens: tuple[int, ...] = ()
    """Host copy: tokens computed per sequence this step."""
    state_slot_list: tuple[int, ...] = ()
    """Host copy of `state_slots` (empty when None)."""

    def window_mask(self, window: int) -> torch.Tensor:
        """`[num_seqs, 1, max_query_len, max_context_len] bool` causal mask that also hides keys `window` or
        more positions behind the query (HF's sliding window: key > query - window), padding keys included."""
        if window not in self._window_masks:
            assert self.query_positions is not None, "AttentionMetadata built without query positions"
            key_pos = torch.arange(self.context_slots.shape[1], device=self.query_positions.device)
            query = self.query_positions.unsqueeze(-1)  # [num_seqs, max_query_len, 1]
            mask = (key_pos <= query) & (key_pos > query - window)
            self._window_masks[window] = mask.unsqueeze(1)
        return self._window_masks[window]

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], block_size: int) -> AttentionMetadata:
        num_seqs = len(chunks)
        query_lens = [c.num_tokens for c in chunks]
        context_lens = [c.start + c.num_tokens for c in chunks]
        max_q, max_ctx = max(query_lens), max(context_lens)
        # Built from Python lists in one tensor each: a torch call per sequence (an arange, a row copy) cost
        # about a millisecond per batch-32 decode step on a 2-core CPU.
        positions = torch.tensor([p for c in chunks for p in range(c.start, c.start + c.num_tokens)], dtype=torch.int64)
        max_blocks = -(-max_ctx // block_size)
        rows = []
        for chunk in chunks:
            needed = -(-(chunk.start + chunk.num_tokens) // block_size)
            rows.append([*chunk.block_ids[:needed], *([0] * (max_blocks - needed))])
        table = torch.tensor(rows, dtype=torch.int64).view(num_seqs, max_blocks)
        key_pos = torch.arange(max_ctx)
        context_slots = table[:, key_pos // block_size] * block_size + key_pos % block_size
        ctx = torch.tensor(context_lens)
        if min(query_lens) == max_q == 1:
            # One token per sequence: its slot straight from the lists, 24-50 us a build faster than the gather.
            slots = [
                row[c.start // block_size] * block_size + c.start % block_size
                for row, c in zip(rows, chunks, strict=True)
            ]
            slot_mapping = torch.tensor(slots, dtype=torch.int64)
            last = torch.arange(num_seqs)
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(query_lens))
            slot_mapping = table[seq_of_token, positions // block_size] * block_size + positions % block_size
            last = torch.tensor(query_lens).cumsum(0) - 1
        has_states = any(c.state_slot >= 0 for c in chunks)
        state_slots = torch.tensor([c.state_slot for c in chunks], dtype=torch.int64) if has_states else None
        seq_starts = tuple(c.start for c in chunks)
        state_slot_list = tuple(c.state_slot for c in chunks) if has_states else ()
        if max_q == 1:
            padding = None if min(context_lens) == max_ctx else (key_pos[None, :] < ctx[:, None])[:, None, None, :]
            return cls(
                positions,
                slot_mapping,
                context_slots,
                None,
                padding,
                None,
                num_seqs,
                1,
                last,
                query_positions=positions.view(num_seqs, 1),
                state_slots=state_slots,
                seq_starts=seq_starts,
                query_lens=tuple(query_lens),
                state_slot_list=state_slot_list,
            )
        offsets = torch.cat([torch.arange(n) for n in query_lens])
        query_index = seq_of_token * max_q + offsets
        # Padded query rows get position 0 so that their mask row is never empty (no NaN from softmax).
        padded_pos = torch.zeros(num_seqs * max_q, dtype=torch.int64)
        padded_pos[query_index] = positions
        mask = key_pos[None, None, :] <= padded_pos.view(num_seqs, max_q, 1)
        return cls(
            positions,
            slot_mapping,
            context_slots,
            mask.unsqueeze(1),
            None,
            query_index,
            num_seqs,
            max_q,
            last,
            query_positions=padded_pos.view(num_seqs, max_q),
            state_slots=state_slots,
            seq_starts=seq_starts,
            query_lens=tuple(query_lens),
            state_slot_list=state_slot_list,
        )

    def to_device(
        self, device: torch.device, *extra: torch.Tensor
    ) -> tuple[AttentionMetadata, tuple[torch.Tensor, ...]]:
        """This metadata on `device` and the `extra` int64 host tensors (e.g. the step's token ids) with it, all
        in one host-to-device copy; on the CPU, self and `extra` unchanged.

        The index tensors are packed into one pinned buffer (where a pinned buffer can be had), copied once
        without blocking the host, and split into views there; the boolean masks are rebuilt on the device from
        the copied positions, so nothing but int64 crosses and nothing is read back.
        """
        if device.type == "cpu":
            return self, extra
        ctx = self.context_slots.shape[1]
        lengths = torch.tensor([s + n for s, n in zip(self.seq_starts, self.query_lens, strict=True)])
        parts: dict[str, torch.Tensor] = {
            "positions": self.positions,
            "slot_mapping": self.slot_mapping,
            "context_slots": self.context_slots,
            "last_token_index": self.last_token_index,
            "context_lens": lengths,
        }
        for name in ("query_index", "query_positions", "state_slots"):
            value = getattr(self, name)
            if value is not None:
                parts[name] = value
        flat = [t.reshape(-1).to(torch.int64) for t in (*parts.values(), *extra)]
        packed = torch.cat(flat)
        if _can_pin(device):
            packed = packed.pin_memory()
        moved = packed.to(device, non_blocking=True)
        views, offset = [], 0
        for tensor, part in zip((*parts.values(), *extra), flat, strict=True):
            views.append(moved[offset : offset + part.numel()].view(tensor.shape))
            offset += part.numel()
        on_device = dict(zip(parts, views[: len(parts)], strict=True))
        key_pos = torch.arange(ctx, device=device)
        mask = key_padding = None
        if self.query_index is not None:
            padded = on_device["query_positions"]
            mask = (key_pos[None, None, :] <= padded.unsqueeze(-1)).unsqueeze(1)
        elif self.key_padding is not None:
            key_padding = (key_pos[None, :] < on_device["context_lens"][:, None])[:, None, None, :]
        meta = AttentionMetadata(
            on_device["positions"],
            on_device["slot_mapping"],
            on_device["context_slots"],
            mask,
            key_padding,
            on_device.get("query_index"),
            self.num_seqs,
            self.max_query_len,
            on_device["last_token_index"],
            query_positions=on_device.get("query_positions"),
            state_slots=on_device.get("state_slots"),
            seq_starts=self.seq_starts,
            query_lens=self.query_lens,
            state_slot_list=self.state_slot_list,
        )
        return meta, tuple(views[len(parts) :])


def _can_pin(device: torch.device) -> bool:
    """Pinned host memory needs the accelerator's runtime (and means nothing for `meta`)."""
    if device.type == "meta":
        return False
    try:
        return bool(torch.cuda.is_available()) if device.type == "cuda" else False
    except RuntimeError:
        return False
