"""Matrix-vector products in the orientation that streams weights fastest on CPU.

Decode is bound by reading weights. On the CPUs we measured (Xeon with AMX/avx512_bf16, torch 2.13),
`F.linear(x, w)` for a few rows of bf16 `x` reads weights at 11-15 GB/s, while the weight-stationary
forms — `torch.mv(w, x)` for one row, `w @ x.T` for a few, `torch.bmm(w, x.T)` for stacked experts —
reach 16-21 GB/s (`python -m benchmarks.kernels` prints the comparison on the current machine). The
results are the same products; only the loop order inside the BLAS call differs. Other devices and
dtypes keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this many rows the product is compute-bound and the library's own choice is as good.
WEIGHT_STATIONARY_MAX_ROWS = 64
# Weights at least this large (the LM head) stream faster as two halves in one bmm than through
# torch.mv / F.linear (24-28 GB/s against 9-17 GB/s for a 32000x1024 head at 1-32 rows).
SPLIT_MIN_BYTES = 16 << 20
SPLIT_PARTS = 2


def _weight_stationary(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[0] <= WEIGHT_STATIONARY_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x: [rows, in]` @ `weight: [out, in]`.T (+ bias) -> `[rows, out]`, contiguous."""
    if not _weight_stationary(x):
        return F.linear(x, weight, bias)
    rows, (out_features, in_features) = x.shape[0], weight.shape
    if weight.nbytes >= SPLIT_MIN_BYTES and out_features % SPLIT_PARTS == 0 and weight.is_contiguous():
        halves = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
        out = torch.bmm(halves, x.T.unsqueeze(0).expand(SPLIT_PARTS, in_features, rows))  # [parts, out/parts, rows]
        out = out.permute(2, 0, 1).reshape(rows, out_features).contiguous()
    elif rows == 1:
        out = torch.mv(weight, x[0]).unsqueeze(0)
    else:
        out = (weight @ x.T).T.contiguous()
    return out if bias is None else out + bias
