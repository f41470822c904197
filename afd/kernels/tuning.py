"""Which linear form to run, measured on this machine at first use of each weight shape and row count.

A fixed rule tuned on one CPU lost on another (afd.kernels' docstring has the figures), so the choice is
measured where it runs: the first call for a (rows bucket, out, in, packable) times each form on copies of a
weight of that shape, rotated through more memory than the last-level cache holds (decode reads weights
from memory, not from cache), alternating the forms over a few rounds, and keeps the fastest. A shape
costs a few milliseconds to tens of milliseconds once per process; the choices are kept for the
process's life and listed by `choices()` (the benchmarks print them).

`AFD_KERNEL_TUNING=off` skips the measurement and takes the fixed preference: the native kernels where
they built, else torch's `F.linear`. The packed form (afd.kernels.packed_linear) is a candidate only for weights
it may pack, so a weight it may not (an expert's slice) gets its own choice among the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from afd.kernels import native, packed_linear

LINEAR_FORMS = ("native", "library", "stationary", "packed")
"""native: afd.kernels.native's C++ kernel; library: F.linear; stationary: torch.mv / w @ x.T / split bmm;
packed: oneDNN on the weight packed once (afd.kernels.packed_linear)."""
TUNING_ENV = "AFD_KERNEL_TUNING"
ROTATION_BYTES = 96 << 20
"""Weight copies the measurement cycles through: over the 32 MiB last-level caches of the CPUs we use."""
ROUNDS = 5
MARGIN = 0.15
"""A form replaces the preferred one (the first of `candidates()`) only when it is this much faster: a
neighbour process that steals a core during one form's rounds must not flip the choice to a slower form."""

LinearForm = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]

_lock = threading.Lock()
_choices: dict[tuple[int, int, int, bool], str] = {}


def rows_bucket(rows: int) -> int:
    """The power of two at or above `rows`: the row count a shape is tuned for."""
    return 1 << max(0, rows - 1).bit_length()


def tuning_enabled() -> bool:
    return not native.switched_off(TUNING_ENV)


def candidates(packable: bool = True) -> tuple[str, ...]:
    """The forms that can run here, the preferred first; `packable`: whether the weight may be packed."""
    return tuple(
        form
        for form in LINEAR_FORMS
        if (form != "native" or native.load() is not None)
        and (form != "packed" or (packable and packed_linear.available()))
    )


def choose_linear_form(rows: int, out_features: int, in_features: int, run: LinearForm, packable: bool = True) -> str:
    """The form for `[rows, in] @ [out, in].T` in bf16 on this CPU; `run(form, x, weight)` computes one.
    `packable`: the weight may take the packed form (afd.kernels.packed_linear.packable)."""
    key = (rows_bucket(rows), out_features, in_features, packable)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    with _lock:
        if key not in _choices:
            forms = candidates(packable)
            _choices[key] = _measure(key, forms, run) if tuning_enabled() and len(forms) > 1 else forms[0]
        return _choices[key]


def _measure(key: tuple[int, int, int, bool], forms: tuple[str, ...], run: LinearForm) -> str:
    rows, out_features, in_features, packable = key
    nbytes = out_features * in_features * 2
    copies = max(2, min(64, ROTATION_BYTES // nbytes))
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    weights = [base] + [base.clone() for _ in range(copies - 1)]
    if packable:
        packed_linear.allow(weights)  # stand-ins for a long-lived weight; packed copies go with them
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    best = dict.fromkeys(forms, float("inf"))
    for form in forms:  # first touch of every copy, and any lazy initialisation inside the form
        run(form, x, weights[0])
    for _ in range(ROUNDS):
        for form in forms:
            start = time.perf_counter()
            for weight in weights:
                run(form, x, weight)
            best[form] = min(best[form], time.perf_counter() - start)
    preferred = forms[0]
    fastest = min(forms, key=lambda form: best[form])
    return fastest if best[fastest] < (1 - MARGIN) * best[preferred] else preferred


def choices() -> dict[str, str]:
    """The forms chosen so far in this process, keyed "rows x out x in" (with " unpacked" for weights that may not
    be packed)."""
    with _lock:
        return {f"{r}x{o}x{i}{'' if p else ' unpacked'}": form for (r, o, i, p), form in sorted(_choices.items())}


def reset() -> None:
    """Forget the choices (tests, and benchmarks that compare forms)."""
    with _lock:
        _choices.clear()
