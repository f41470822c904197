"""Kernels by operation, one interface each, with the implementation chosen per device and shape.

- `linear(x, weight, bias)`: every projection of both halves (attention, gates, experts, LM head).
- `routed_experts_swiglu(...)`: the FFN node's routed experts in one call (every batch with AVX512-BF16 or AMX,
  decode batches with AVX2), or None where no fused implementation serves and the caller's torch path runs.
- `paged_decode_attention(...)`: attention of one new token per sequence read straight from the paged KV
  cache (no gather of the context), or None for the torch path (gather + scaled_dot_product_attention).
- `rms_norm(x, weight, eps)`: RMSNorm in one native call for bf16 on CPU (torch decomposes it into eight
  small ops there, about 11 us for one 1024-wide row against 1.6 us), or None for the torch path.
- `rope(x, cos, sin)`: rotary embedding over whole heads (halves not interleaved) in one native call for bf16 on
  CPU, bit-identical to torch's four ops, or None for the torch path.
- `add_partials(residual, parts)`: several FFN nodes' partial sums into the residual in one native call (bf16 on
  CPU), bit-identical to the fp32 sum + one rounding of the torch path; False where the caller's path runs.
- `greedy_tokens(logits)`: the first maximum of each row of float32 logits (greedy sampling), in one native call
  on an AVX512 CPU, else torch's `max`.

Decode is bound by reading weights, and which call reads them fastest differs from CPU to CPU: on an
Intel Xeon with AMX, torch's weight-stationary forms (`torch.mv`, `w @ x.T`, the LM head as two halves
in one `bmm`) streamed bf16 weights at 16-28 GB/s against 11-15 GB/s for `F.linear`; on an AMD EPYC
(avx512_bf16, no AMX) `F.linear` read 48.6 GB/s against 27.7 GB/s for `torch.mv` on a 1536x1024 matrix.
So on CPU with bf16 and up to 64 rows, the form is measured at first use for each weight shape and
power-of-two row count (afd.kernels.tuning), among torch's two forms, the native kernels
(afd.kernels.native, C++ built on this machine) where they built, and oneDNN on a weight packed once
(afd.kernels.packed_linear; at a few dozen rows, where the product is compute-bound). Other devices and dtypes take
`F.linear` and torch's own choice inside it. All forms compute the same products with fp32
accumulation; they differ only in the order of the fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd.kernels import native, packed_linear
from afd.kernels.tuning import LINEAR_FORMS, choose_linear_form

# Above this many rows the product is compute-bound and the library's own choice is as good.
TUNED_MAX_ROWS = 64
# Weights at least this large (the LM head) stream faster as two halves in one bmm than through
# torch.mv on some CPUs; the tuner measures that form like the others.
SPLIT_MIN_BYTES = 16 << 20
SPLIT_PARTS = 2
# With AVX512-BF16 dot products (and on AMX tiles) the fused native expert kernel serves every batch: prefill too,
# where it beats torch's padded bmm (on a 2-vCPU AMD EPYC, avx512_bf16, one layer of the `afd bench engine`
# checkpoint at 128 / 256 / 1024 / 2048 tokens: 6.1 / 7.7 / 32.3 / 67.8 ms against 12.4 / 11.8 / 44.0 / 80.7, medians
# of 7 alternating calls, before the busy experts took torch's matmul inside it: 20-21 ms at 1024 tokens since; on
# an AMX Xeon a 32 x 32-token prefill took 287 ms against 333). With AVX2 only it serves
# decode batches up to this many tokens: at 1024 tokens it took 190 ms against the bmm's 44.
FUSED_EXPERTS_MAX_TOKENS = 64


def _tuned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.dim() == 2
        and x.shape[0] <= TUNED_MAX_ROWS
        and weight.is_contiguous()
    )


def _stationary(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight-stationary torch forms: `mv` for one row, `w @ x.T` for a few, halves in a `bmm`."""
    rows, (out_features, in_features) = x.shape[0], weight.shape
    if weight.nbytes >= SPLIT_MIN_BYTES and out_features % SPLIT_PARTS == 0:
        halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
        out = torch.bmm(halves, x.T.unsqueeze(0).expand(SPLIT_PARTS, in_features, rows))  # [parts, out/parts, rows]
        return out.permute(2, 0, 1).reshape(rows, out_features).contiguous()
    if rows == 1:
        return torch.mv(weight, x[0]).unsqueeze(0)
    return (weight @ x.T).T.contiguous()


def _native_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    module = native.load()
    assert module is not None  # the tuner offers "native" only where it loaded
    return module.linear_bf16(x.contiguous(), weight)


def linear_form(name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` through one named form (see LINEAR_FORMS); the tuner and the benchmarks call this."""
    if name == "native":
        return _native_linear(x, weight)
    if name == "stationary":
        return _stationary(x, weight)
    if name == "library":
        return F.linear(x, weight)
    if name == "packed":
        return packed_linear.linear(x, weight)
    raise ValueError(f"unknown linear form {name!r}; expected one of {LINEAR_FORMS}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x: [rows, in]` @ `weight: [out, in]`.T (+ `bias: [out]`) -> `[rows, out]`, contiguous, x's dtype."""
    if not _tuned(x, weight):
        return F.linear(x, weight, bias)
    form = choose_linear_form(x.shape[0], weight.shape[0], weight.shape[1], linear_form, packed_linear.packable(weight))
    out = linear_form(form, x, weight)
    return out if bias is None else out + bias


def routed_experts_swiglu(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
) -> list[int] | None:
    """Fused routed-expert SwiGLU where one serves this call, else None (nothing was computed).

    hidden: `[tokens, hidden]`; expert_ids: `[tokens, top_k]` local ids (-1: held elsewhere); expert_weights:
    `[tokens, top_k] float32`; gate_up: `[experts, 2 * intermediate, hidden]`; down: `[experts, hidden,
    intermediate]`; out: `[tokens, hidden]`, to which the weighted expert outputs are added. Returns the
    tokens each local expert received. Each hit expert's weights are read once for all of its tokens, and
    the rounding matches ffn_nodes.experts' torch path step for step.
    """
    if (
        hidden.device.type != "cpu"
        or hidden.dtype != torch.bfloat16
        or gate_up.dtype != torch.bfloat16
        or not (gate_up.is_contiguous() and down.is_contiguous() and out.is_contiguous())
    ):
        return None
    module = native.load()
    if module is None or (hidden.shape[0] > FUSED_EXPERTS_MAX_TOKENS and module.available_isa() != "avx512_bf16"):
        return None
    counts = module.moe_swiglu_bf16(
        hidden.contiguous(),
        expert_ids.to(torch.int64).contiguous(),
        expert_weights.to(torch.float32).contiguous(),
        gate_up,
        down,
        out,
    )
    return counts.tolist()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of `x: [rows, D]` or `[rows, groups, D]` (last dim contiguous) with `weight: [D]` or
    `[groups, D]` in one native call, bit-identical to `weight * F.rms_norm(x)`; None where it does not serve
    (other devices or dtypes, other layouts, no native kernels) and the caller's torch path runs."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.dim() not in (2, 3)
        or x.stride(-1) != 1
        or not weight.is_contiguous()
        or weight.shape[-1] != x.shape[-1]
        or (weight.dim() == 2 and (x.dim() != 3 or weight.shape[0] != x.shape[1]))
        or weight.dim() > 2
    ):
        return None
    module = native.load()
    return None if module is None else module.rms_norm_bf16(x, weight, eps)


def paged_decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    context_slots: torch.Tensor,
    context_lens: torch.Tensor,
    kv_heads: int,
    scale: float,
) -> torch.Tensor | None:
    """Decode attention of `query: [seqs, heads, head_dim]` (one token per sequence) over the paged cache, or
    None where the native kernel does not serve (not bf16 on an AVX512 CPU) and the caller gathers the context
    and runs torch's attention instead.

    cache: `[slots, 2 * kv_heads * head_dim]` with K then V of each slot; context_slots: `[seqs, ctx] int64`;
    context_lens: `[seqs] int64` valid keys of each sequence. Returns `[seqs, heads * head_dim]`. The result is
    torch's CPU flash attention up to the order of fp32 sums (the same roundings: bf16 probabilities times V,
    one division and one rounding at the end): outputs differ from it by a bf16 step or two, as far from the
    exact attention as torch's are (tests/unit/test_native_kernels.py).
    """
    head_dim = query.shape[-1]
    if (
        query.device.type != "cpu"
        or query.dtype != torch.bfloat16
        or cache.dtype != torch.bfloat16
        or not cache.is_contiguous()
        or query.stride(-1) != 1
        or cache.shape[1] != 2 * kv_heads * head_dim
    ):
        return None
    module = native.load()
    if module is None or module.available_isa() != "avx512_bf16":
        return None
    return module.decode_attention_bf16(
        query, cache, context_slots.contiguous(), context_lens.contiguous(), 0, kv_heads * head_dim, kv_heads, scale
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`x: [tokens, heads, head_dim]` rotated by `cos, sin: [tokens, 1, head_dim]` (RotaryEmbedding's tables, sin
    signed), every feature rotated, halves not interleaved; None where the native kernel does not serve (other
    devices or dtypes, other layouts) and the caller's torch path runs."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.bfloat16
        or cos.dtype != torch.bfloat16
        or sin.dtype != torch.bfloat16
        or x.dim() != 3
        or x.stride(-1) != 1
        or cos.shape != (x.shape[0], 1, x.shape[2])
        or sin.shape != cos.shape
        or cos.stride(-1) != 1
        or sin.stride(-1) != 1
    ):
        return None
    module = native.load()
    return None if module is None else module.rope_bf16(x, cos, sin)


def add_partials(residual: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    """`residual: [tokens, hidden]` += the sum of `parts` (each `([n, hidden], rows: [n] int64 | None)`, None: every
    row) in float32, in order, rounded once; True when the native kernel did it, False (nothing done) where it
    does not serve: other devices or dtypes, no native kernels."""
    if residual.device.type != "cpu" or residual.dtype != torch.bfloat16 or not residual.is_contiguous():
        return False
    if any(part.dtype != torch.bfloat16 or part.device.type != "cpu" for part, _ in parts):
        return False
    module = native.load()
    if module is None:
        return False
    no_rows = torch.empty(0, dtype=torch.int64)
    module.add_partials_bf16(
        residual,
        [part.contiguous() for part, _ in parts],
        [no_rows if rows is None else rows.to(torch.int64).contiguous() for _, rows in parts],
    )
    return True


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits: [rows, vocab] float32` -> `[rows] int64`: each row's first largest entry, NaN counting as the
    largest (exactly `logits.max(dim=-1).indices`, which is 3x faster than argmax on CPU)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        module = native.load()
        if module is not None and module.available_isa() == "avx512_bf16" and logits.shape[1] > 0:
            return module.argmax_rows_f32(logits)
    return logits.max(dim=-1).indices
