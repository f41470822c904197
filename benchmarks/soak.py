"""`afd bench soak`: steady greedy load for N minutes, reported per minute, with memory and KV at the end.

What an operator asks before trusting a deployment: does it keep answering, correctly, without growing?
Workers loop over a fixed prompt set with greedy sampling (temperature 0, ignore_eos), so every answer to
a prompt must be the same text: the first answer of each prompt is its reference and a later different
one counts as *changed*. A request with no complete answer within `request_timeout_s` counts as *hung*;
any other error as *failed*. Per interval (a minute by default): requests, success rate, p50/p99 latency,
output tokens/s and the RSS of each process the soak can see; at the end the router's
`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` once the load has stopped (both must go back
to 0, or something leaked).

The baseline is the run's own first interval: the last interval's throughput, p99 and total RSS are
reported as ratios to it, so drift shows without comparing figures across runs (or machines).

The soak loads any OpenAI-compatible server; process RSS is known only for processes it is told about
(`process_ids`), which the CLI does when it starts the cluster itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from afd.errors import ConfigError
from benchmarks.serve_cluster import get_json
from benchmarks.serve_dataset import SampleRequest, random_word_requests
from benchmarks.serve_request import send_streaming_request

ProcessIds = Callable[[], Mapping[str, int]]
"""Process name -> pid, asked again at every sample (nodes may come and go)."""


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """One soak run."""

    base_url: str
    """Server root, http://host:port (no /v1)."""
    minutes: float = 5.0
    """How long the load runs."""
    concurrency: int = 8
    """Requests in flight, each worker sending its next request when the last one ends."""
    num_prompts: int = 16
    """Distinct prompts cycled through (each one's first answer is its reference)."""
    input_len: int = 16
    """Words per prompt."""
    output_len: int = 32
    """Tokens generated per request (ignore_eos)."""
    request_timeout_s: float = 120.0
    """A request without its complete answer by then is hung."""
    interval_s: float = 60.0
    """Width of one row of the report."""
    api_key: str | None = None
    """Bearer token for a server started with --api-key-file."""
    seed: int = 0
    """Seed of the prompt set."""

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {self.minutes}")
        for name in ("concurrency", "num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(slots=True)
class _Outcome:
    ended: float
    """Seconds after the soak started."""
    kind: str
    """ok, failed, hung or changed."""
    latency_s: float
    output_tokens: int
    error: str = ""


@dataclass(slots=True)
class IntervalRow:
    """What one interval of the soak saw (requests counted in the interval they ended in)."""

    index: int
    requests: int
    succeeded: int
    failed: int
    hung: int
    changed: int
    success_rate: float
    p50_latency_ms: float | None
    p99_latency_ms: float | None
    output_tok_s: float
    rss_mb: dict[str, float] = field(default_factory=dict)
    """Resident memory of each known process at the end of the interval."""


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` in MiB from /proc (None when it is gone or not on Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sample_rss(process_ids: ProcessIds | None) -> dict[str, float]:
    if process_ids is None:
        return {}
    sampled = {name: rss_mb(pid) for name, pid in process_ids().items()}
    return {name: round(value, 1) for name, value in sampled.items() if value is not None}


_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(?P<value>\S+)$")


def metric_totals(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named Prometheus gauge/counter over its label sets (absent names are left out)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line.strip())
        if match and match["name"] in names:
            totals[match["name"]] = totals.get(match["name"], 0.0) + float(match["value"])
    return totals


def _payload(model: str, request: SampleRequest) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.expected_output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _row(index: int, outcomes: list[_Outcome], interval_s: float, rss: dict[str, float]) -> IntervalRow:
    kinds = [o.kind for o in outcomes]
    latencies = [o.latency_s * 1000 for o in outcomes if o.kind == "ok"]
    ok = kinds.count("ok")

    def percentile(p: float) -> float | None:
        return round(float(np.percentile(latencies, p)), 1) if latencies else None

    return IntervalRow(
        index=index,
        requests=len(outcomes),
        succeeded=ok,
        failed=kinds.count("failed"),
        hung=kinds.count("hung"),
        changed=kinds.count("changed"),
        success_rate=round(ok / len(outcomes), 4) if outcomes else math.nan,
        p50_latency_ms=percentile(50),
        p99_latency_ms=percentile(99),
        output_tok_s=round(sum(o.output_tokens for o in outcomes if o.kind == "ok") / interval_s, 1),
        rss_mb=rss,
    )


class _Soak:
    """The workers, the reference texts and the per-interval samples of one run."""

    def __init__(self, config: SoakConfig, process_ids: ProcessIds | None) -> None:
        self.config = config
        self.process_ids = process_ids
        self.prompts = random_word_requests(config.num_prompts, config.input_len, config.output_len, 0.0, config.seed)
        self.references: dict[int, str] = {}
        self.outcomes: list[_Outcome] = []
        self.rss: list[dict[str, float]] = []
        self.examples: dict[str, str] = {}
        """One error message per outcome kind, to say what went wrong."""

    async def run(self) -> dict[str, Any]:
        config = self.config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=config.concurrency + 4)
        async with httpx.AsyncClient(headers=headers, timeout=config.request_timeout_s, limits=limits) as client:
            models, why = await get_json(client, config.base_url + "/v1/models", headers)
            if not models or not models.get("data"):
                raise ConfigError(f"{config.base_url}/v1/models did not list a model: {why or models}")
            model = models["data"][0]["id"]
            self.origin = time.perf_counter()
            deadline = self.origin + config.minutes * 60
            workers = [asyncio.ensure_future(self._work(client, model, w, deadline)) for w in range(config.concurrency)]
            sampler = asyncio.ensure_future(self._sample_every_interval(deadline))
            await asyncio.gather(*workers)
            sampler.cancel()
            elapsed = time.perf_counter() - self.origin
            self.rss.append(_sample_rss(self.process_ids))
            after = await self._settled_metrics(client, headers)
        return self._summary(elapsed, after)

    async def _work(self, client: httpx.AsyncClient, model: str, worker: int, deadline: float) -> None:
        config = self.config
        turn = worker
        while time.perf_counter() < deadline:
            index = turn % len(self.prompts)
            turn += config.concurrency
            planned = self.prompts[index]
            url = config.base_url + "/v1/completions"
            try:
                output = await asyncio.wait_for(
                    send_streaming_request(client, url, _payload(model, planned), planned, False, self.origin),
                    config.request_timeout_s,
                )
            except asyncio.TimeoutError:
                self._record("hung", 0.0, 0, f"no complete answer within {config.request_timeout_s:.0f} s")
                continue
            if not output.success:
                self._record("failed", 0.0, 0, output.error)
                continue
            reference = self.references.setdefault(index, output.generated_text)
            if output.generated_text != reference:
                self._record("changed", output.latency, 0, f"prompt {index}: {output.generated_text[:80]!r}")
                continue
            self._record("ok", output.latency, output.output_tokens)

    def _record(self, kind: str, latency_s: float, tokens: int, error: str = "") -> None:
        self.outcomes.append(_Outcome(time.perf_counter() - self.origin, kind, latency_s, tokens, error))
        if error:
            self.examples.setdefault(kind, error)

    async def _sample_every_interval(self, deadline: float) -> None:
        interval = self.config.interval_s
        while True:
            next_edge = self.origin + (len(self.rss) + 1) * interval
            if next_edge > deadline:
                return
            await asyncio.sleep(max(0.0, next_edge - time.perf_counter()))
            self.rss.append(_sample_rss(self.process_ids))

    async def _settled_metrics(self, client: httpx.AsyncClient, headers: Mapping[str, str]) -> dict[str, float]:
        """Router gauges after the load: heartbeats lag, so wait (bounded) for the running count to reach 0."""
        names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        totals: dict[str, float] = {}
        give_up = time.perf_counter() + 15.0
        while time.perf_counter() < give_up:
            try:
                response = await client.get(self.config.base_url + "/metrics", headers=headers)
            except httpx.HTTPError:
                return totals
            if response.status_code != 200:
                return totals
            totals = metric_totals(response.text, names)
            if not any(totals.values()):
                break
            await asyncio.sleep(0.5)
        return totals

    def _summary(self, elapsed: float, after: dict[str, float]) -> dict[str, Any]:
        interval = self.config.interval_s
        # requests still in flight at the deadline end a little after it: they count in the last interval
        count = max(1, math.ceil(self.config.minutes * 60 / interval - 1e-6))
        buckets: list[list[_Outcome]] = [[] for _ in range(count)]
        for outcome in self.outcomes:
            buckets[min(count - 1, int(outcome.ended // interval))].append(outcome)
        rows = []
        for index, bucket in enumerate(buckets):
            width = elapsed - index * interval if index == count - 1 else interval
            rss = self.rss[index] if index < len(self.rss) else self.rss[-1]
            rows.append(_row(index, bucket, width, rss))
        first, last = rows[0], rows[-1]
        total = _row(-1, self.outcomes, elapsed, self.rss[-1])

        def ratio(now: float | None, then: float | None) -> float | None:
            return round(now / then, 3) if now is not None and then else None

        return {
            "benchmark": "soak",
            "base_url": self.config.base_url,
            "minutes": round(elapsed / 60, 2),
            "concurrency": self.config.concurrency,
            "output_len": self.config.output_len,
            "requests": total.requests,
            "succeeded": total.succeeded,
            "failed": total.failed,
            "hung": total.hung,
            "changed": total.changed,
            "success_rate": total.success_rate,
            "p99_latency_ms": total.p99_latency_ms,
            "output_tok_s": total.output_tok_s,
            "rss_mb_end": total.rss_mb,
            "num_requests_running_end": after.get("vllm:num_requests_running"),
            "num_requests_waiting_end": after.get("vllm:num_requests_waiting"),
            "kv_cache_usage_end": after.get("vllm:kv_cache_usage_perc"),
            "baseline": "first interval of this run",
            "last_vs_first_output_tok_s": ratio(last.output_tok_s, first.output_tok_s),
            "last_vs_first_p99_latency": ratio(last.p99_latency_ms, first.p99_latency_ms),
            "last_vs_first_total_rss": ratio(sum(last.rss_mb.values()), sum(first.rss_mb.values())),
            "errors": self.examples,
            "intervals": [asdict(row) for row in rows],
        }


def run_soak(config: SoakConfig, process_ids: ProcessIds | None = None) -> dict[str, Any]:
    """Run the soak against `config.base_url`; the summary dict (also what the JSON line holds)."""
    return asyncio.run(_Soak(config, process_ids).run())


def report(result: Mapping[str, Any], json_only: bool) -> None:
    print(json.dumps(result))
    if json_only:
        return
    table = Table(
        title=f"Soak: {result['minutes']} min, {result['concurrency']} in flight, {result['output_len']} tokens each"
    )
    for column in ("#", "req", "ok %", "fail", "hung", "chg", "p50 ms", "p99 ms", "tok/s", "RSS MiB"):
        table.add_column(column)
    for row in result["intervals"]:
        table.add_row(
            str(row["index"] + 1),
            str(row["requests"]),
            f"{100 * row['success_rate']:.1f}" if row["requests"] else "-",
            str(row["failed"]),
            str(row["hung"]),
            str(row["changed"]),
            str(row["p50_latency_ms"] or "-"),
            str(row["p99_latency_ms"] or "-"),
            f"{row['output_tok_s']:.1f}",
            f"{sum(row['rss_mb'].values()):.0f}" if row["rss_mb"] else "-",
        )
    console = Console()
    console.print(table)
    console.print(
        f"end: running {result['num_requests_running_end']}, waiting {result['num_requests_waiting_end']}, "
        f"KV usage {result['kv_cache_usage_end']}; last/first interval: tok/s {result['last_vs_first_output_tok_s']}, "
        f"p99 {result['last_vs_first_p99_latency']}, RSS {result['last_vs_first_total_rss']}"
    )
    if result["rss_mb_end"]:
        console.print("RSS MiB at the end: " + ", ".join(f"{k} {v:.0f}" for k, v in result["rss_mb_end"].items()))
    for kind, example in result["errors"].items():
        console.print(f"{kind}: e.g. {example}")
