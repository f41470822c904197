"""oneDNN's prepacked bf16 linear: a weight reordered once into the library's blocked layout, then multiplied.

Why: `F.linear` on a CPU hands oneDNN a plain row-major weight, and oneDNN reorders it into its blocked layout on
every call. With a few dozen input rows the product is compute-bound and that reorder is a large part of the call;
with the weight packed once it is gone. On a 2-vCPU AMD EPYC (avx512_bf16, no AMX), medians of 9 rounds of 10-20 calls
on weights rotated past the caches (ad-hoc loops; `python -m benchmarks.kernels` times the forms on any machine):
the 32000 x 1024 LM head at 32 rows took 3.0 ms packed against 4.1 through the native tiles and 5.7 through
`F.linear`; a 1536 x 1024 projection at 32 rows 0.16 against 0.20 ms; at 1-4 rows the native tiles were ahead on
the projections (0.042 against 0.054 ms at 1 row), at 8 rows the two within 5 %. Which form serves a shape is
measured per machine (afd.kernels.tuning); this is one of the candidates, the call the inductor backend makes for
packed linears.

Only weights that their owner declared long-lived (`allow`: the attention half's projections and LM head at
load) are packed: a weight made per call (a per-expert slice of a stacked expert tensor) would be packed anew
each time. The packed copy lives as long as its weight (a weak reference drops both) and costs the weight's
size again in memory, made only for shapes where the tuner picks the form. `AFD_PACKED_LINEAR=off` removes it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable

import torch

from afd.kernels import native

log = logging.getLogger(__name__)

DISABLE_ENV = "AFD_PACKED_LINEAR"
"""off (or 0 / false / no): the tuner never offers the packed form."""
PACK_ROWS_HINT = 32
"""The row count oneDNN is told to expect when packing; its packed layout served 1-32 rows alike here."""

_lock = threading.Lock()
_available: bool | None = None
_allowed: dict[int, weakref.ref[torch.Tensor]] = {}
"""id -> weak reference of each allowed weight that is alive."""
_packed: dict[int, torch.Tensor] = {}
"""id -> packed copy, for allowed weights packed so far; dropped with the weight."""


def available() -> bool:
    """Whether this torch build runs oneDNN's packed bf16 linear (probed once per process)."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    if native.switched_off(DISABLE_ENV):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        weight = torch.ones(16, 32, dtype=torch.bfloat16)
        x = torch.ones(2, 32, dtype=torch.bfloat16)
        out = _multiply(x, torch.ops.mkldnn._reorder_linear_weight(weight, 2))
    except (AttributeError, RuntimeError) as exc:  # an older or oneDNN-less torch: the other forms serve
        log.info("packed linear form unavailable in torch %s: %s", torch.__version__, exc)
        return False
    return out.shape == (2, 16) and bool((out == 32).all())


def allow(weights: Iterable[torch.Tensor]) -> None:
    """Declare `weights` long-lived, so that `linear` may pack them (bf16 CPU matrices; others are ignored)."""
    with _lock:
        for weight in weights:
            if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
                continue
            key = id(weight)
            if key in _allowed and _allowed[key]() is weight:
                continue

            def forget(ref: weakref.ref[torch.Tensor], key: int = key) -> None:
                if _allowed.get(key) is ref:  # not a later weight at the same address
                    del _allowed[key]
                    _packed.pop(key, None)

            _allowed[key] = weakref.ref(weight, forget)


def packable(weight: torch.Tensor) -> bool:
    """Whether `linear` may pack `weight`: allowed (`allow`), contiguous, and oneDNN bf16 is here."""
    ref = _allowed.get(id(weight))
    return ref is not None and ref() is weight and weight.is_contiguous() and available()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight: [out, in] bf16`, allowed (`packable`), packed once on first use and kept while it lives."""
    packed = _packed.get(id(weight))
    if packed is None:
        with _lock:
            packed = _packed.get(id(weight))
            if packed is None:
                packed = _packed[id(weight)] = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x: [rows, in] bf16` @ `weight: [out, in] bf16`.T -> `[rows, out] bf16`, on the packed weight."""
    if not packable(weight):
        raise ValueError(
            f"the packed form serves only weights declared long-lived (packed_linear.allow), contiguous, with "
            f"oneDNN bf16 in torch; this {tuple(weight.shape)} {weight.dtype} weight on {weight.device}: allowed "
            f"{_allowed.get(id(weight)) is not None}, contiguous {weight.is_contiguous()}, oneDNN bf16 {available()}"
        )
    return _multiply(x.contiguous(), packed_weight(weight))


def packed_count() -> int:
    """Weights packed and alive in this process."""
    return len(_packed)


def _multiply(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
