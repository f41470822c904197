"""`afd bench serve --plot out.png`: the TTFT and ITL distributions of one run, as CDFs with their percentiles.

Drawn from the per-request lists of the result (`ttfts`, `itls`, `errors`, the same fields `--save-result`
writes), so a saved result can be plotted again later with `plot_latency_distributions(json.load(f), path)`.
Only successful requests count, as in the statistics. matplotlib's Agg canvas draws without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afd.errors import AfdError

MARKED_PERCENTILES = (50.0, 90.0, 99.0)


def latency_samples_ms(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """{"ttft": [...], "itl": [...]} in milliseconds over the successful requests of a result."""
    ok = [not error for error in result["errors"]]
    ttfts = [t * 1000.0 for t, good in zip(result["ttfts"], ok, strict=True) if good]
    itls = [gap * 1000.0 for gaps, good in zip(result["itls"], ok, strict=True) if good for gap in gaps]
    return {"ttft": ttfts, "itl": itls}


def _cdf_panel(axes: Any, values: Sequence[float], title: str) -> None:
    data = np.sort(np.asarray(values, dtype=np.float64))
    if data.size == 0:
        axes.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(title)
        return
    share = np.arange(1, data.size + 1) / data.size
    axes.step(data, share, where="post", color="tab:blue")
    for p in MARKED_PERCENTILES:
        value = float(np.percentile(data, p))
        axes.axvline(value, color="tab:red", alpha=0.35, linewidth=1)
        axes.annotate(f"p{p:g} {value:.1f}", (value, p / 100.0), fontsize=8, xytext=(3, -10),
                      textcoords="offset points")  # fmt: skip
    axes.set_title(f"{title}: {data.size} samples, mean {data.mean():.1f} ms")
    axes.set_xlabel("ms")
    axes.set_ylabel("share of samples")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)


def plot_latency_distributions(result: Mapping[str, Any], path: Path) -> Path:
    """Write a PNG with the TTFT and ITL CDFs of `result`; raises AfdError without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display
    except ImportError:
        raise AfdError("--plot needs matplotlib: pip install 'afd[plot]'") from None
    samples = latency_samples_ms(result)
    figure = Figure(figsize=(11, 4), layout="constrained")
    ttft_axes, itl_axes = figure.subplots(1, 2)
    _cdf_panel(ttft_axes, samples["ttft"], "Time to first token")
    _cdf_panel(itl_axes, samples["itl"], "Inter-token latency")
    rate = result.get("request_rate")
    figure.suptitle(
        f"{result.get('model_id')}: {result.get('completed')} requests, rate {rate}, "
        f"max concurrency {result.get('max_concurrency')}, {result.get('output_throughput', 0):.1f} output tok/s"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
