"""MiniMax lightning attention: the decayed linear recurrence and the per-request state it keeps.

A lightning layer replaces softmax over a KV cache by a state `S: [heads, head_dim, head_dim]` per request:
every token adds its `k^T v` to the state after decaying it by `exp(-slope)` (one slope per head), and reads
`q S`. Its memory does not grow with the context, so these layers hold no paged cache; the state lives in a
`LinearStateStore`, one slot per running request, that the KV cache manager allocates and frees together
with the request's blocks (finish, abort, preemption), so the scheduler keeps seeing one opaque handle.

Numerics follow the transformers reference (`MiniMaxLightningAttention`) operation for operation, because
greedy tokens must equal its `generate`:
- a request's first chunk (no state yet) runs the reference's blocked prefill: blocks of `block_size` tokens,
  the intra-block part as decayed `(q k^T) v`, the inter-block part as `q S`, the state carried block to block;
- a chunk that continues a state (chunked prefill) runs the same blocks, aligned to multiples of
  `block_size` in absolute position, so chunks that end on block boundaries compute exactly the reference's
  blocks (other chunk boundaries agree up to rounding: the algebra is the same);
- a decode token runs the reference's one-token recurrence `S = exp(-slope) S + k^T v; o = q S`.
The state is kept in the model dtype, as the reference keeps it.

Unlike KV cache writes, the in-place state updates are not idempotent: the engine snapshots the states of a
step's requests and restores them when the step fails midway (an FFN node died), before it runs again.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afd.errors import ConfigError
from afd.kernels import linear
from afd.model_spec import ModelSpec
from attn_nodes.attention import rms_norm
from attn_nodes.attention_metadata import AttentionMetadata

NORM_EPS = 1e-6
"""Epsilon of the norm over all heads' outputs: the reference builds it with RMSNorm's default, not the
config's rms_norm_eps."""


def decay_tables(spec: ModelSpec, layer: int) -> dict[str, torch.Tensor]:
    """The reference's decay buffers of `layer`, in float32.

    slope_rate `[heads, 1, 1]`; query_decay `[heads, block, 1]` = exp(-slope (i + 1)); key_decay
    `[heads, block, 1]` = exp(-slope (block - i - 1)); diagonal_decay `[1, heads, block, block]` =
    exp(-slope (i - j)) for i >= j, else 0.
    """
    assert spec.linear_attention is not None
    heads, block = spec.num_heads, spec.linear_attention.block_size
    base = 1 / (2 ** (8 / heads))
    factor = 1 - layer / (spec.num_layers - 1 + 1e-5) + 1e-5
    slope = (base ** (torch.arange(heads, dtype=torch.float32) + 1) * factor)[:, None, None]
    steps = torch.arange(block, dtype=torch.float32) + 1
    query_decay = torch.exp(-slope * steps[:, None])
    key_decay = torch.exp(-slope * (block - steps[:, None]))
    diagonal = slope * (steps[:, None] - steps[None, :])[None, None, :, :]
    diagonal = torch.exp(torch.where(diagonal >= 0, -diagonal, float("-inf")))
    return {"slope_rate": slope, "query_decay": query_decay, "key_decay": key_decay, "diagonal_decay": diagonal}


class LightningAttention:
    """One lightning-attention layer: q/k/v = silu(qkv_proj x) per head, the decayed linear attention, the norm
    over all heads, a sigmoid output gate from x, and the output projection."""

    def __init__(
        self, spec: ModelSpec, layer: int, w: dict[str, torch.Tensor], decays: dict[str, torch.Tensor] | None = None
    ) -> None:
        """`w`: qkv_proj, output_gate, attn_norm, out_proj (see TensorNames.linear_attention). `decays`: the
        checkpoint's stored decay tables (the reference uses those when present); computed from the config when
        None."""
        assert spec.linear_attention is not None
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.block_size = spec.linear_attention.block_size
        self.qkv_proj, self.output_gate = w["qkv_proj"], w["output_gate"]
        self.norm, self.out_proj = w["attn_norm"], w["out_proj"]
        dtype, device = self.qkv_proj.dtype, self.qkv_proj.device
        tables = decays if decays is not None else decay_tables(spec, layer)
        # The reference's buffers are cast with the model, so its decays are in the model dtype.
        self.slope_rate = tables["slope_rate"].to(device, dtype)
        self.query_decay = tables["query_decay"].to(device, dtype)
        self.key_decay = tables["key_decay"].to(device, dtype)
        self.diagonal_decay = tables["diagonal_decay"].to(device, dtype)
        self.ratio = torch.exp(-self.slope_rate)
        """`[heads, 1, 1]` one token's decay of the state."""

    def forward(
        self, x: torch.Tensor, meta: AttentionMetadata, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x: `[num_tokens, hidden]` normalised input (model dtype); states: `[num_state_slots, heads, head_dim,
        head_dim]` this layer's states, updated in place for the sequences of `meta` (`meta.state_slots`).
        cos/sin are unused (no rotary embedding here); they keep the call the same as softmax attention's."""
        del cos, sin
        if meta.state_slots is None:
            raise ValueError("a lightning-attention layer needs AttentionMetadata.state_slots (one per sequence)")
        heads, dim = self.heads, self.head_dim
        qkv = F.silu(linear(x, self.qkv_proj)).view(-1, heads, 3 * dim)
        q, k, v = torch.split(qkv, dim, dim=-1)  # [num_tokens, heads, dim] each
        # The per-sequence loop reads the metadata's host copies: nothing is read back from the device.
        starts, slots = meta.seq_starts, meta.state_slot_list
        ends = list(itertools.accumulate(meta.query_lens))
        firsts = [0, *ends[:-1]]
        out = torch.empty_like(q)
        decode = [i for i in range(meta.num_seqs) if ends[i] - firsts[i] == 1 and starts[i] > 0]
        if decode:
            rows = torch.tensor([firsts[i] for i in decode], device=q.device)
            index = torch.tensor([slots[i] for i in decode], device=q.device)
            out[rows] = self._recur(q[rows], k[rows], v[rows], states, index)
        for i in sorted(set(range(meta.num_seqs)) - set(decode)):
            rows_slice = slice(firsts[i], ends[i])
            state = states[slots[i]] if starts[i] > 0 else torch.zeros_like(states[slots[i]])
            seq_out, states[slots[i]] = self._blocks(q[rows_slice], k[rows_slice], v[rows_slice], state, starts[i])
            out[rows_slice] = seq_out
        attn = rms_norm(out.reshape(-1, heads * dim), self.norm, NORM_EPS)
        attn = torch.sigmoid(linear(x, self.output_gate)) * attn
        return linear(attn, self.out_proj)

    def _recur(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """One decode token per sequence (`q/k/v: [seqs, heads, dim]`), the reference's recurrence."""
        state = self.ratio * states[index] + torch.matmul(k.unsqueeze(-1), v.unsqueeze(-2))
        states[index] = state
        return torch.matmul(q.unsqueeze(-2), state).squeeze(-2)

    def _blocks(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, start + n) of one sequence (`q/k/v: [n, heads, dim]`) from `state: [heads, dim, dim]`;
        returns the outputs `[n, heads, dim]` and the state after the last token."""
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, dim], as the reference
        kv = state.unsqueeze(0)
        outputs = []
        n, offset = q.shape[2], 0
        while offset < n:
            size = min(self.block_size - (start + offset) % self.block_size, n - offset)
            qb, kb, vb = (t[:, :, offset : offset + size] for t in (q, k, v))
            intra = torch.matmul(qb, kb.transpose(-1, -2))
            intra = torch.matmul(intra * self.diagonal_decay[:, :, :size, :size], vb)
            inter = torch.matmul(qb * self.query_decay[:, :size], kv)
            outputs.append(inter + intra)
            block_decay = torch.exp(-self.slope_rate * size)
            kv = kv * block_decay + torch.matmul((kb * self.key_decay[:, -size:]).transpose(-1, -2), vb)
            offset += size
        return torch.cat(outputs, dim=-2)[0].transpose(0, 1), kv[0]


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """Saved states of some slots (LinearStateStore.snapshot)."""

    slots: torch.Tensor
    """`[n] int64` slots saved."""
    states: dict[int, torch.Tensor]
    """layer -> `[n, heads, head_dim, head_dim]` their states."""


class LinearStateStore:
    """Recurrent states of the running requests: one slot per request, every lightning layer's state in it.

    Allocation is all-or-nothing like the KV blocks: `take` gives a request its slot (zeroed) or None when
    every slot is held. `KVCacheManager` owns the store and frees a request's slot with its blocks.
    """

    def __init__(self, spec: ModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if spec.linear_attention is None:
            raise ConfigError(f"{spec.architecture} has no linear-attention layers to keep a state for")
        if num_slots < 1:
            raise ConfigError(f"a linear-attention state store needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        shape = (num_slots, spec.num_heads, spec.head_dim, spec.head_dim)
        self.tensors = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer in spec.linear_attention.layers}
        """layer -> `[num_slots, heads, head_dim, head_dim]` states of that layer (model dtype)."""
        self._free: deque[int] = deque(range(num_slots))
        self._slots: dict[str, int] = {}

    @staticmethod
    def bytes_per_slot(spec: ModelSpec, dtype: torch.dtype) -> int:
        """Memory of one request's state over all lightning layers."""
        layers = len(spec.linear_attention.layers) if spec.linear_attention else 0
        return layers * spec.num_heads * spec.head_dim**2 * torch.empty((), dtype=dtype).element_size()

    def take(self, request_id: str) -> int | None:
        """The request's slot (a fresh, zeroed one if it has none), or None if every slot is held."""
        if request_id in self._slots:
            return self._slots[request_id]
        if not self._free:
            return None
        slot = self._free.popleft()
        for tensor in self.tensors.values():
            tensor[slot].zero_()
        self._slots[request_id] = slot
        return slot

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def slot(self, request_id: str) -> int:
        """The request's slot, or -1 if it holds none."""
        return self._slots.get(request_id, -1)

    def layer(self, layer: int) -> torch.Tensor:
        return self.tensors[layer]

    def snapshot(self, slots: list[int]) -> StateSnapshot:
        """Copies of `slots`' states, taken before a step: a step updates states in place, which, unlike the KV
        cache's writes, is not idempotent, so a step that fails midway (an FFN node died) must be undone before
        it runs again."""
        index = torch.tensor(slots, dtype=torch.int64, device=next(iter(self.tensors.values())).device)
        return StateSnapshot(index, {layer: tensor[index].clone() for layer, tensor in self.tensors.items()})

    def restore(self, snapshot: StateSnapshot) -> None:
        """Put the states of a snapshot back."""
        for layer, saved in snapshot.states.items():
            self.tensors[layer][snapshot.slots] = saved

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._slots)
