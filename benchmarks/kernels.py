"""`python -m benchmarks.kernels`: weight-streaming rate of the matmul forms afd.kernels chooses between.

Decode reads every weight once per step, so what matters is GB/s of weights read. The weight sets rotate
through ~1 GB so the last-level cache cannot hold them. Prints a table and one JSON line per shape with
each form's GB/s and its ratio to `F.linear`, the baseline, measured in the same run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

TOTAL_BYTES = 1 << 30


def _rate(fn: Callable[[int], object], count: int, nbytes: int, repeats: int = 3) -> float:
    for i in range(count):  # first touch
        fn(i)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(count):
            fn(i)
    return nbytes * count * repeats / (time.perf_counter() - start) / 1e9


def measure(out_features: int = 1536, in_features: int = 1024, experts: int = 16) -> list[dict]:
    nbytes = out_features * in_features * 2
    count = TOTAL_BYTES // nbytes
    weights = torch.randn(count, out_features, in_features, dtype=torch.bfloat16)
    rows = []
    for m in (1, 4, 32):
        x = torch.randn(m, in_features, dtype=torch.bfloat16)
        forms = {
            "F.linear": lambda i, x=x: F.linear(x, weights[i]),
            "w @ x.T": lambda i, x=x: weights[i] @ x.T,
        }
        if m == 1:
            forms["torch.mv"] = lambda i, x=x: torch.mv(weights[i], x[0])
        rates = {name: _rate(fn, count, nbytes) for name, fn in forms.items()}
        rows.append({"shape": f"{out_features}x{in_features}", "rows": m, "gb_s": rates})
    stacked = weights[: (count // experts) * experts].view(-1, experts, out_features, in_features)
    for m in (1, 4):
        x = torch.randn(experts, in_features, m, dtype=torch.bfloat16)
        xs = x.transpose(1, 2)
        rates = {
            "F.linear": _rate(
                lambda i, xs=xs: [F.linear(xs[e], stacked[i, e]) for e in range(experts)],
                len(stacked),
                nbytes * experts,
            ),
            "torch.bmm(w, x.T)": _rate(lambda i, x=x: torch.bmm(stacked[i], x), len(stacked), nbytes * experts),
        }
        rows.append({"shape": f"{experts}x{out_features}x{in_features}", "rows": m, "gb_s": rates})
    for row in rows:
        base = row["gb_s"]["F.linear"]
        row["ratio_vs_f_linear"] = {name: round(rate / base, 2) for name, rate in row["gb_s"].items()}
        row["gb_s"] = {name: round(rate, 2) for name, rate in row["gb_s"].items()}
    return rows


def main() -> None:
    rows = measure()
    table = Table(title="bf16 weight streaming (GB/s of weights read), weights rotating through 1 GiB")
    for column in ("weights", "rows", "form", "GB/s", "vs F.linear"):
        table.add_column(column)
    for row in rows:
        print(json.dumps(row))
        for name, rate in row["gb_s"].items():
            table.add_row(row["shape"], str(row["rows"]), name, f"{rate:.1f}", f"{row['ratio_vs_f_linear'][name]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
