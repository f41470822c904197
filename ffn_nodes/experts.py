"""Grouped SwiGLU expert compute over a batch of (token, local expert, weight) assignments.

Assignments are sorted by expert once, so each expert's tokens are a contiguous block. Then, with
no Python loop over tokens:
- on accelerators, one grouped matmul (`torch.nn.functional.grouped_mm`) over all experts;
- on CPU when most experts received tokens (large decode batches), one batched matmul over all local
  experts with the tokens padded to the busiest expert's count — it streams the stacked weights at
  close to memory bandwidth (see afd.kernels);
- on CPU when few experts are hit (small batches), a loop over just those experts, so the weights of
  idle experts are never read;
- on CPU in bf16 for every batch where the native kernels have AVX512-BF16 (or AMX), for decode batches on AVX2,
  ahead of all of these, the fused native kernel (afd.kernels.routed_experts_swiglu) where it built: one call per
  layer that reads each hit expert's weights once for all its tokens, with the same rounding as the torch
  paths below ("fused" forces it where it serves; the other strategies force a torch path).

Every other device (CUDA, ROCm, XPU, ... and `meta`) takes the sync-free path instead, chosen by the weights'
device, not by a guess: all shapes are fixed by the request's shape, nothing is read back to the host (no
per-expert counts, no `tolist`/`item`), so the host queues a layer's kernels without waiting for the device.
The (token, expert) slots are sorted with "held elsewhere" last, the per-expert counts come from a fixed-size
scatter_add, and one `grouped_mm` per projection computes all experts where the device and dtype support it;
elsewhere a padded bmm over every local expert with room for all slots. Rows no expert computed are selected
away with `torch.where` (never multiplied by zero: uncomputed rows may hold NaN). The load counters then
accumulate in device tensors, read only by whoever reports them (heartbeats), off the compute path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from afd.kernels import linear, routed_experts_swiglu

Strategy = Literal["auto", "fused", "grouped", "padded", "looped"]

# "auto" on CPU: the padded bmm once at least this share of the local experts received tokens.
PADDED_MIN_BUSY_SHARE = 0.7

# Up to this many (token, expert) slots - decode of one or two tokens - skip the sort-and-gather path.
FEW_ASSIGNMENTS = 8

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_serves(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs both projections of these weights on their device (dtype, and the strides of
    these shapes: CUDA's kernel wants 16-byte aligned rows). Tried once at load with one row, never per call."""
    if _grouped_mm is None:
        return False
    experts, hidden, intermediate = gate_up.shape[0], gate_up.shape[2], down.shape[2]
    offsets = torch.ones(experts, dtype=torch.int32, device=gate_up.device)
    try:
        _grouped_mm(gate_up.new_zeros(1, hidden), gate_up.transpose(-2, -1), offs=offsets)
        _grouped_mm(gate_up.new_zeros(1, intermediate), down.transpose(-2, -1), offs=offsets)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def sync_free_by_device(device: torch.device, sync_free: bool | None) -> bool:
    """The sync-free path everywhere but on the CPU, unless `sync_free` forces one (tests run it on CPU)."""
    return device.type != "cpu" if sync_free is None else sync_free


class ExpertLoad:
    """Load counters of one layer's local experts: tokens per expert and experts hit, summed over calls.

    The host paths add Python ints; the sync-free path adds into device tensors without reading them. Only
    the thread that runs `forward` adds and the counts only grow, so readers (FfnShard.expert_token_counts ->
    FfnNodeServer.take_load) take differences between readings; a reading of the device counters is the one
    device-to-host read, and it happens in the reader (heartbeat, status), never on the compute path.
    """

    def __init__(self, num_local: int) -> None:
        self.num_local = num_local
        self._host_tokens = [0] * num_local
        self._host_hit = 0
        self._device_tokens: torch.Tensor | None = None
        self._device_hit: torch.Tensor | None = None

    @property
    def expert_tokens(self) -> list[int]:
        """Tokens routed to each local expert since load (expert load metrics, hot-expert detection); a copy."""
        counts = list(self._host_tokens)  # list(): one copy under the GIL
        device = self._device_tokens
        if device is not None and device.device.type != "meta":  # meta holds no numbers to read
            counts = [host + extra for host, extra in zip(counts, device.tolist(), strict=True)]
        return counts

    @property
    def experts_hit(self) -> int:
        """Sum over calls of the experts that received at least one token (weight bytes actually read)."""
        device = self._device_hit
        extra = int(device) if device is not None and device.device.type != "meta" else 0
        return self._host_hit + extra

    def _count(self, per_expert: list[int]) -> int:
        """Add one call's tokens per local expert (read on the host) to the counters; returns the experts hit."""
        busy = 0
        for expert, count in enumerate(per_expert):
            if count:
                self._host_tokens[expert] += count
                busy += 1
        self._host_hit += busy
        return busy

    def _count_on_device(self, per_expert: torch.Tensor) -> None:
        """Add one call's `[num_local] int64` tokens per expert, on their device, without reading them."""
        if self._device_tokens is None or self._device_hit is None:
            self._device_tokens = torch.zeros(self.num_local, dtype=torch.int64, device=per_expert.device)
            self._device_hit = torch.zeros((), dtype=torch.int64, device=per_expert.device)
        self._device_tokens += per_expert
        self._device_hit += (per_expert > 0).sum()


def _sorted_slots(
    expert_ids: torch.Tensor, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sync-free grouping of `[tokens, top_k]` local ids: every slot keeps its place in fixed shapes.

    Returns (expert of each slot in sorted order `[slots]`, with `num_local` for "held elsewhere" (-1) so
    those sort last; the slot order `[slots]`; each sorted slot's token `[slots]`; tokens per local expert
    `[num_local] int64`). An id out of range counts as elsewhere too: on an accelerator an out-of-range
    index is a device-side assert that kills the process (the server's frame checks refuse such frames).
    """
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).to(torch.int64)
    key = torch.where((flat >= 0) & (flat < num_local), flat, num_local)
    sorted_key, order = torch.sort(key, stable=True)
    per_expert = torch.zeros(num_local + 1, dtype=torch.int64, device=flat.device)
    per_expert.scatter_add_(0, key, torch.ones_like(key))
    return sorted_key, order, order // top_k, per_expert[:num_local]


def _add_weighted_slots(
    out: torch.Tensor,
    y: torch.Tensor,
    expert_weights: torch.Tensor,
    order: torch.Tensor,
    tokens: torch.Tensor,
    held: torch.Tensor,
) -> None:
    """The sync-free paths' last step: `out[tokens] += y * weight` for the slots held here (`held: [slots] bool`),
    exact zeros for the others (torch.where: their rows of `y` may hold anything, NaN included). `y: [slots,
    hidden]` in sorted-slot order, `order` / `tokens` as _sorted_slots gives them; the routing weights are rounded
    to y's dtype first, as the host paths do."""
    weights = expert_weights.reshape(-1).index_select(0, order).to(y.dtype)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    out.index_add_(0, tokens, torch.where(held.unsqueeze(1), y * weights.unsqueeze(1), zero))


class StackedExperts(ExpertLoad):
    """The routed experts one FFN node holds for one layer, stacked for grouped compute."""

    def __init__(
        self, gate_up: torch.Tensor, down: torch.Tensor, strategy: Strategy = "auto", sync_free: bool | None = None
    ) -> None:
        """gate_up: `[num_local, 2 * intermediate, hidden]` (gate rows first);
        down: `[num_local, hidden, intermediate]`; strategy "auto" picks per call (see the module docstring);
        on the sync-free path only "grouped" and "padded" mean something (the others: grouped where it serves).
        sync_free: None takes the sync-free path on every device but the CPU; True / False force it (tests)."""
        super().__init__(int(gate_up.shape[0]))
        self.gate_up = gate_up
        self.down = down
        self.intermediate = int(down.shape[2])
        self.strategy = strategy
        self.sync_free = sync_free_by_device(gate_up.device, sync_free)
        self._sync_free_kernel = strategy if strategy in ("grouped", "padded") else "auto"
        if self.sync_free and self._sync_free_kernel == "auto":
            self._sync_free_kernel = "grouped" if _grouped_mm_serves(gate_up, down) else "padded"
        # Per-expert views, so the small-batch loop does not pay an indexing kernel per expert.
        self._gate_up_rows = list(gate_up.unbind(0))
        self._down_rows = list(down.unbind(0))

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the weighted expert outputs into `out`.

        hidden: `[num_tokens, hidden] model dtype`; expert_ids: `[num_tokens, top_k] int` local ids, -1 to
        skip; expert_weights: `[num_tokens, top_k] float32`; out: `[num_tokens, hidden]` accumulator in the
        hidden dtype (the weights are rounded to it first, as the reference models do). All on the weights' device.
        """
        if self.sync_free:
            self._forward_sync_free(hidden, expert_ids, expert_weights, out)
            return
        if self.strategy in ("auto", "fused"):
            fused = routed_experts_swiglu(hidden, expert_ids, expert_weights, self.gate_up, self.down, out)
            if fused is not None:
                self._count(fused)
                return
        if expert_ids.numel() <= FEW_ASSIGNMENTS and self.strategy in ("auto", "looped"):
            self._few_assignments(hidden, expert_ids, expert_weights, out)
            return
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        # counts[0] counts the "-1 = elsewhere" slots, so that one sort puts them first and one sync reads all.
        counts = torch.bincount(flat + 1, minlength=self.num_local + 1)
        per = counts.tolist()
        elsewhere, per_expert = per[0], per[1:]
        if elsewhere == flat.numel():
            return
        expert_counts = counts[1:]
        busy = self._count(per_expert)
        order = torch.sort(flat, stable=True).indices[elsewhere:]
        tokens = order // top_k
        weights = expert_weights.reshape(-1)[order]
        x = hidden.index_select(0, tokens)
        strategy = self.strategy
        if strategy == "auto":
            # Padded reads every local expert's weights in one bmm; looped reads only the busy ones, one
            # matrix-vector product at a time, which streams slower (`python -m benchmarks.kernels` measured about
            # 23 GB/s against 14-19 GB/s). Break-even is near 70 % of the experts busy.
            strategy = "padded" if busy >= PADDED_MIN_BUSY_SHARE * self.num_local else "looped"
        if strategy == "grouped":
            y = self._grouped_swiglu(x, expert_counts)
        elif strategy == "padded":
            y = self._padded_swiglu(x, flat[order].to(torch.int64), expert_counts, max(per_expert))
        else:
            y = self._looped_swiglu(x, per_expert)
        out.index_add_(0, tokens, y * weights.to(y.dtype).unsqueeze(1))

    def _forward_sync_free(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """`forward` without a device-to-host read: every shape follows the request's (see the module docstring).

        The same products, rounding and order of additions into `out` as the host path's stable sort +
        index_add_; the elsewhere slots (sorted last) add exact zeros."""
        slots = expert_ids.numel()
        if slots == 0:
            return
        sorted_key, order, tokens, per_expert = _sorted_slots(expert_ids, self.num_local)
        self._count_on_device(per_expert)
        x = hidden.index_select(0, tokens)
        if self._sync_free_kernel == "grouped":
            # rows past the last offset (the elsewhere slots) are left uncomputed by grouped_mm
            y = self._grouped_swiglu(x, per_expert)
        else:
            y = self._padded_all_slots(x, sorted_key, per_expert, slots)
        _add_weighted_slots(out, y, expert_weights, order, tokens, sorted_key < self.num_local)

    def _padded_all_slots(
        self, x: torch.Tensor, sorted_key: torch.Tensor, per_expert: torch.Tensor, capacity: int
    ) -> torch.Tensor:
        """All local experts in two batched matmuls with room for every slot in each expert (the capacity is
        the slot count, known without reading the counts); `x: [slots, hidden]` sorted by `sorted_key`.
        Rows of elsewhere slots come back holding another row's output: the caller selects them away."""
        local, width = self.num_local, x.shape[1]
        starts = per_expert.cumsum(0) - per_expert
        starts = torch.cat((starts, per_expert.sum().unsqueeze(0)))  # the elsewhere group starts after all
        rows = sorted_key * capacity + torch.arange(x.shape[0], device=x.device) - starts[sorted_key]
        padded = x.new_zeros((local + 1) * capacity, width).index_copy_(0, rows, x)
        padded = padded[: local * capacity].view(local, capacity, width)
        h = torch.bmm(self.gate_up, padded.transpose(1, 2))  # [experts, 2 * intermediate, capacity]
        act = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate :]
        y = torch.bmm(self.down, act)  # [experts, hidden, capacity]
        return y.transpose(1, 2).reshape(-1, y.shape[1]).index_select(0, rows.clamp(max=local * capacity - 1))

    def _few_assignments(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Decode of one or two tokens: group in Python, skipping the sort/gather kernels of the general path.

        Same products, same rounding and the same order of additions into `out` (by expert id, then by
        token) as the general path's stable sort + index_add_, so both give identical results.
        """
        weights = expert_weights.to(out.dtype).tolist()  # rounded to the hidden dtype, as in the general path
        by_expert: dict[int, list[tuple[int, float]]] = {}
        for token, (row_ids, row_weights) in enumerate(zip(expert_ids.tolist(), weights, strict=True)):
            for expert, weight in zip(row_ids, row_weights, strict=True):
                if expert >= 0:
                    by_expert.setdefault(expert, []).append((token, weight))
        if not by_expert:
            return
        self._host_hit += len(by_expert)
        rows, tokens = [], []
        for expert in sorted(by_expert):
            assignments = by_expert[expert]
            self._host_tokens[expert] += len(assignments)
            token_ids = [token for token, _ in assignments]
            x = hidden[token_ids[0] : token_ids[0] + 1] if len(token_ids) == 1 else hidden[token_ids]
            y = swiglu(x, self._gate_up_rows[expert], self._down_rows[expert], self.intermediate)
            if len(assignments) == 1:
                rows.append(y * assignments[0][1])
            else:
                rows.append(y * torch.tensor([w for _, w in assignments], dtype=y.dtype, device=y.device).unsqueeze(1))
            tokens += token_ids
        # One index_add_, as the general path does: it sums a token's rows in float32 before rounding.
        index = torch.tensor(tokens, dtype=torch.int64, device=hidden.device)
        out.index_add_(0, index, rows[0] if len(rows) == 1 else torch.cat(rows))

    def _grouped_swiglu(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        assert _grouped_mm is not None  # "grouped" is only taken where it was asked for or _grouped_mm_serves
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up = _grouped_mm(x, self.gate_up.transpose(-2, -1), offs=offsets)
        act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
        return _grouped_mm(act, self.down.transpose(-2, -1), offs=offsets)

    def _padded_swiglu(self, x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
        """All local experts in two batched matmuls; `x: [assignments, hidden]` sorted by expert `ids`."""
        starts = counts.cumsum(0) - counts
        rows = ids * capacity + torch.arange(ids.shape[0], device=x.device) - starts[ids]
        padded = x.new_zeros(self.num_local * capacity, x.shape[1]).index_copy_(0, rows, x)
        padded = padded.view(self.num_local, capacity, x.shape[1])
        h = torch.bmm(self.gate_up, padded.transpose(1, 2))  # [experts, 2 * intermediate, capacity]
        act = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate :]
        y = torch.bmm(self.down, act)  # [experts, hidden, capacity]
        return y.transpose(1, 2).reshape(-1, y.shape[1]).index_select(0, rows)

    def _looped_swiglu(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                rows = x[start : start + count]
                outputs.append(swiglu(rows, self._gate_up_rows[expert], self._down_rows[expert], self.intermediate))
                start += count
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, intermediate: int) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with `gate_up: [2 * intermediate, hidden]`, `down: [hidden, intermediate]`."""
    h = linear(x, gate_up)
    return linear(F.silu(h[:, :intermediate]) * h[:, intermediate:], down)


class MlpSlice:
    """A slice [start, end) of a dense MLP's (or shared expert's) intermediate dimension."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, strategy: Strategy = "auto") -> None:
        """`gate_up: [2 * width, hidden]` (gate rows first), `down: [hidden, width]`."""
        self.gate_up = gate_up
        self.down = down
        self.width = int(down.shape[1])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden]` partial output of this slice, in the hidden dtype."""
        return swiglu(hidden, self.gate_up, self.down, self.width)


def clamped_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """gpt-oss's expert: down((clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)) + down_bias, with
    g = min(gate, limit); `gate_up: [2 * intermediate, hidden]` (gate rows first) and its bias `[2 * intermediate]`,
    `down: [hidden, intermediate]` and its bias `[hidden]`."""
    intermediate = down.shape[1]
    h = linear(x, gate_up, gate_up_bias)
    gate = h[:, :intermediate].clamp(max=limit)
    up = h[:, intermediate:].clamp(min=-limit, max=limit)
    return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), down, down_bias)


class LoopedExperts(ExpertLoad):
    """Routed experts computed one hit expert at a time, for activations the fused and batched paths do not
    cover (gpt-oss's biased, clamped SwiGLU; Step-3.5's bounded one): subclasses give `expert_output`.

    Same interface and load counters as StackedExperts. On the CPU one sort makes each expert's tokens a
    contiguous block, and the loop runs over the experts that received tokens only (idle experts' weights are
    never read). The sync-free path (every other device) cannot know which experts were hit without reading
    the counts back: it runs every local expert over all the slots and keeps each slot's own expert's rows.
    """

    strategy: Strategy = "looped"

    def __init__(self, num_local: int, device: torch.device, sync_free: bool | None = None) -> None:
        """`device`: the weights' device; sync_free: None takes the sync-free path on every device but the CPU,
        True / False force it (tests)."""
        super().__init__(num_local)
        self.sync_free = sync_free_by_device(device, sync_free)

    def expert_output(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """`rows: [tokens, hidden]` routed to local `expert` -> its output `[tokens, hidden]` in rows' dtype."""
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the weighted expert outputs into `out`; arguments as StackedExperts.forward."""
        if self.sync_free:
            self._forward_sync_free(hidden, expert_ids, expert_weights, out)
            return
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        per = torch.bincount(flat + 1, minlength=self.num_local + 1).tolist()
        elsewhere = per[0]
        if elsewhere == flat.numel():
            return
        order = torch.sort(flat, stable=True).indices[elsewhere:]
        tokens = order // top_k
        x = hidden.index_select(0, tokens)
        outputs, start = [], 0
        for expert, count in enumerate(per[1:]):
            if count:
                self._host_tokens[expert] += count
                self._host_hit += 1
                outputs.append(self.expert_output(expert, x[start : start + count]))
                start += count
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        # Rounded to the hidden dtype before weighting, as the references do (their weights are in that dtype).
        weights = expert_weights.reshape(-1)[order].to(y.dtype)
        out.index_add_(0, tokens, y * weights.unsqueeze(1))

    def _forward_sync_free(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """`forward` without a device-to-host read: each local expert over every slot (fixed shapes), each
        slot keeping its own expert's row; the same order of additions into `out` as the host path."""
        if expert_ids.numel() == 0:
            return
        sorted_key, order, tokens, per_expert = _sorted_slots(expert_ids, self.num_local)
        self._count_on_device(per_expert)
        x = hidden.index_select(0, tokens)
        y = x.new_zeros(x.shape)
        for expert in range(self.num_local):
            # where, not a product with a mask: another expert's rows may overflow to inf or NaN
            y = torch.where((sorted_key == expert).unsqueeze(1), self.expert_output(expert, x), y)
        _add_weighted_slots(out, y, expert_weights, order, tokens, sorted_key < self.num_local)


class ClampedSwigluExperts(LoopedExperts):
    """The routed experts of a gpt-oss layer on one FFN node: biased projections and the clamped SwiGLU."""

    def __init__(
        self,
        gate_up: torch.Tensor,
        gate_up_bias: torch.Tensor,
        down: torch.Tensor,
        down_bias: torch.Tensor,
        alpha: float,
        limit: float,
        sync_free: bool | None = None,
    ) -> None:
        """gate_up: `[num_local, 2 * intermediate, hidden]` (gate rows first), gate_up_bias: `[num_local,
        2 * intermediate]`; down: `[num_local, hidden, intermediate]`, down_bias: `[num_local, hidden]`;
        sync_free as LoopedExperts."""
        super().__init__(int(gate_up.shape[0]), gate_up.device, sync_free)
        self.gate_up, self.gate_up_bias, self.down, self.down_bias = gate_up, gate_up_bias, down, down_bias
        self.alpha, self.limit = alpha, limit
        self.intermediate = int(down.shape[2])

    def expert_output(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(
            rows,
            self.gate_up[expert],
            self.gate_up_bias[expert],
            self.down[expert],
            self.down_bias[expert],
            self.alpha,
            self.limit,
        )
