"""Metrics of `afd bench serve`: what each request measured, the run's statistics, the printed block.

The definitions and JSON field names follow `vllm bench serve`, so its result files and dashboards read
ours: TTFT from sending to the first token chunk; ITL between consecutive token chunks; TPOT
(E2EL - TTFT) / (output tokens - 1); E2EL from sending to the last token; goodput the rate of requests
that meet every given SLO (DistServe's definition). All latencies are kept in seconds per request and
reported in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from afd.errors import ConfigError

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
_WIDTH = 50


@dataclass(slots=True)
class RequestOutput:
    """What the client measured for one request."""

    prompt_len: int
    """Prompt tokens (the server's usage count when reported, else the planned length)."""
    success: bool = False
    """The stream delivered at least one token and ended with `data: [DONE]`."""
    output_tokens: int = 0
    """Generated tokens (the server's usage count when reported, else the number of token chunks)."""
    ttft: float = 0.0
    """Seconds from sending to the first token chunk."""
    itl: list[float] = field(default_factory=list)
    """Seconds between consecutive token chunks."""
    latency: float = 0.0
    """Seconds from sending to the last token chunk (E2EL)."""
    start_time: float = 0.0
    """When the request was sent, seconds after the benchmark started."""
    generated_text: str = ""
    """Concatenated text of the token chunks."""
    error: str = ""
    """Why the request failed; empty on success."""


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """`["ttft:500 tpot:50", "e2el:2000"]` -> {"ttft": 500.0, ...} (milliseconds); pairs split on spaces/commas."""
    slos: dict[str, float] = {}
    for pair in (p for spec in specs for p in spec.replace(",", " ").split()):
        name, sep, value = pair.partition(":")
        try:
            if not sep:
                raise ValueError
            milliseconds = float(value)
        except ValueError:
            raise ConfigError(f"goodput SLO {pair!r} is not KEY:MILLISECONDS (e.g. ttft:500)") from None
        if name not in SLO_METRICS:
            raise ConfigError(f"goodput SLO {name!r} is unknown; use one of {', '.join(SLO_METRICS)}")
        if not milliseconds >= 0 or math.isinf(milliseconds):
            raise ConfigError(f"goodput SLO {pair!r} must be a finite number of milliseconds >= 0")
        slos[name] = milliseconds
    return slos


def parse_percentiles(text: str) -> tuple[float, ...]:
    """ "25,50,99" -> (25.0, 50.0, 99.0), each in (0, 100]."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"metric percentiles {text!r} are not comma-separated numbers") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ConfigError(f"metric percentiles {text!r} must be one or more numbers in (0, 100]")
    return values


def percentile_key(p: float) -> str:
    """99.0 -> "p99", 99.9 -> "p99.9" (vLLM's key spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def _stats(name: str, seconds: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    # vLLM reports 0 for a metric with no samples (e.g. TPOT when every output has one token); so do we.
    values = np.asarray(seconds if len(seconds) else [0.0], dtype=np.float64) * 1000.0
    stats = {
        f"mean_{name}_ms": float(values.mean()),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(values.std()),
    }
    for p in percentiles:
        stats[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(values, p))
    return stats


def _tpot(output: RequestOutput) -> float:
    """Seconds per output token after the first; 0 for one-token outputs (counts as meeting a TPOT SLO)."""
    return (output.latency - output.ttft) / (output.output_tokens - 1) if output.output_tokens > 1 else 0.0


def _meets_slos(output: RequestOutput, slos_ms: Mapping[str, float]) -> bool:
    measured = {"ttft": output.ttft, "tpot": _tpot(output), "e2el": output.latency}
    return all(measured[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def _peaks(done: Sequence[RequestOutput]) -> tuple[float, int]:
    """Most token chunks received in one wall-clock second, and most requests in flight at once.

    As `vllm bench serve` computes max_output_tokens_per_s and max_concurrent_requests: seconds counted from
    the first successful request's start, and an exact sweep over half-open [start, end) intervals.
    """
    if not done:
        return 0.0, 0
    origin = min(o.start_time for o in done)
    per_second: dict[int, int] = {}
    for o in done:
        arrivals = o.start_time + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        for second in ((arrivals - origin) // 1).astype(int):
            per_second[int(second)] = per_second.get(int(second), 0) + 1
    # Ends sort before starts at the same instant: intervals are half-open [start, end).
    events = sorted([(o.start_time, 1) for o in done] + [(o.start_time + o.latency, -1) for o in done])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return float(max(per_second.values())), peak


def compute_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float],
    goodput_slos_ms: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The run's statistics and per-request lists under vLLM's result field names.

    Failed requests count in `failed` and `errors` only; every other statistic is over successful ones.
    `request_goodput` is None when no SLO is given.
    """
    if duration_s <= 0:
        raise ConfigError(f"benchmark duration must be > 0, got {duration_s}")
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    good = sum(_meets_slos(o, goodput_slos_ms) for o in done) if goodput_slos_ms else 0
    peak_tokens_per_s, peak_concurrency = _peaks(done)
    result: dict[str, Any] = {
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": good / duration_s if goodput_slos_ms else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": peak_tokens_per_s,
        "max_concurrent_requests": peak_concurrency,
    }
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": [_tpot(o) for o in done if o.output_tokens > 1],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    for name in LATENCY_METRICS:
        result |= _stats(name, samples[name], percentiles)
    result |= {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [list(o.itl) for o in outputs],
        "latencies": [o.latency for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }
    return result


def _line(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40} {text:<10}".rstrip()


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{_WIDTH}}"


def format_result_block(
    result: Mapping[str, Any],
    percentiles: Sequence[float],
    printed_metrics: Sequence[str] = LATENCY_METRICS,
) -> str:
    """The "Serving Benchmark Result" block of a `run_serve_benchmark` result, like vLLM's, plus AFD lines."""
    lines = [
        _rule(" Serving Benchmark Result ", "="),
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
    ]
    if result.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", result["max_concurrency"]))
    if result.get("request_rate") not in (None, "inf"):
        lines.append(_line("Request rate configured (RPS):", float(result["request_rate"])))
    lines += [
        _line("Benchmark duration (s):", result["duration"]),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", result["request_throughput"]),
    ]
    if result.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"]))
    lines += [
        _line("Output token throughput (tok/s):", result["output_throughput"]),
        _line("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
        _line("Peak concurrent requests:", result["max_concurrent_requests"]),
        _line("Total token throughput (tok/s):", result["total_token_throughput"]),
    ]
    for name in (m for m in LATENCY_METRICS if m in printed_metrics):
        short, header = _HEADERS[name]
        lines += [
            _rule(header, "-"),
            _line(f"Mean {short} (ms):", result[f"mean_{name}_ms"]),
            _line(f"Median {short} (ms):", result[f"median_{name}_ms"]),
        ]
        lines += [
            _line(f"P{percentile_key(p)[1:]} {short} (ms):", result[f"{percentile_key(p)}_{name}_ms"])
            for p in percentiles
        ]
    lines += _cluster_lines(result)
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


_ROLE_NAMES = {"attention": "Attention", "ffn": "FFN", "router": "Router"}


def _listing(value: object) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


def _cluster_lines(result: Mapping[str, Any]) -> list[str]:
    topology = result.get("topology")
    if not topology:
        return []
    lines = [
        _rule("AFD Cluster", "-"),
        _line("Attention nodes:", topology["attention_nodes"]),
        _line("FFN nodes:", topology["ffn_nodes"]),
    ]
    if topology.get("transport") is not None:
        lines.append(_line("Transport:", _listing(topology["transport"])))
    if topology.get("microbatches") is not None:
        lines.append(_line("Microbatches:", _listing(topology["microbatches"])))
    for role, rate in (result.get("per_role_tokens_per_s") or {}).items():
        lines.append(_line(f"{_ROLE_NAMES.get(role, role)} tokens/s (server):", float(rate)))
    busy = result.get("ffn_busy_fraction") or {}
    if busy.get("max_over_mean") is not None:
        lines.append(_line("FFN busy max/mean:", float(busy["max_over_mean"])))
    hardware = result.get("hardware") or {}
    for role, kinds in hardware.items():
        if isinstance(kinds, Mapping) and kinds:
            devices = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
            lines.append(_line(f"{_ROLE_NAMES.get(role, role)} devices:", devices))
    return lines
