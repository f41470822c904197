"""AttentionMetadata.build: the decode-only shortcut gives the slots the general varlen path gives."""

from __future__ import annotations

import torch

from attn_nodes.attention_metadata import AttentionMetadata, SequenceChunk


def test_decode_steps_write_each_token_to_its_block_slot() -> None:
    # Starts on a block boundary, inside a block and at the last slot of a block; block ids out of order.
    chunks = [SequenceChunk([7, 2, 9], 16, 1), SequenceChunk([4], 5, 1), SequenceChunk([3, 8], 15, 1)]
    meta = AttentionMetadata.build(chunks, block_size=16)
    assert meta.slot_mapping.tolist() == [2 * 16 + 0, 4 * 16 + 5, 3 * 16 + 15]
    assert meta.last_token_index.tolist() == [0, 1, 2]
    assert meta.positions.tolist() == [16, 5, 15] and meta.max_query_len == 1 and meta.mask is None


def test_decode_slots_equal_the_varlen_path_with_a_prefill_beside_them() -> None:
    decode = [SequenceChunk([5, 1], 20, 1), SequenceChunk([6], 3, 1)]
    alone = AttentionMetadata.build(decode, block_size=16)
    mixed = AttentionMetadata.build([*decode, SequenceChunk([0], 0, 2)], block_size=16)
    assert torch.equal(mixed.slot_mapping[:2], alone.slot_mapping)
    assert mixed.last_token_index.tolist() == [0, 1, 3]
