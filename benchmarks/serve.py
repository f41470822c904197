"""`afd bench serve`: load an OpenAI-compatible server and report latency and throughput like `vllm bench serve`.

It works against any OpenAI-compatible server (the AFD router, vLLM, SGLang): streaming requests with
`stream_options.include_usage` and `ignore_eos`, so every output has the requested length and token
counts come from the server, with no client-side tokenizer. Arrivals are Poisson/gamma at `--request-rate`,
capped at `--max-concurrency` requests in flight. The result carries vLLM's JSON field names, so tooling
made for `vllm bench serve` reads it, plus what an AFD router reports on GET /afd/v1/cluster: the
topology, tokens/s per role and the hardware of each role (null against other servers).

The in-process entry point is `run_serve_benchmark(ServeBenchmarkConfig(...)) -> dict` (or
`arun_serve_benchmark` inside an event loop); `command` is the typer command behind the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from afd.errors import AfdError, ConfigError, PeerError
from benchmarks.serve_cluster import (
    ClusterSnapshot,
    cluster_topology,
    fetch_cluster,
    ffn_busy,
    get_json,
    hardware_summary,
)
from benchmarks.serve_cluster import per_role_tokens_per_s as role_rates
from benchmarks.serve_dataset import (
    SampleRequest,
    arrival_offsets,
    check_arrivals,
    check_workload,
    random_token_requests,
    random_word_requests,
)
from benchmarks.serve_metrics import (
    LATENCY_METRICS,
    RequestOutput,
    compute_metrics,
    format_result_block,
    parse_goodput,
    parse_percentiles,
)
from benchmarks.serve_plot import plot_latency_distributions
from benchmarks.serve_request import send_streaming_request

# Ids below 1000 exist in every real tokenizer's vocabulary and in the built-in demo model's (~1000 words).
DEFAULT_VOCAB_SIZE = 1000
EndpointPath = Literal["/v1/completions", "/v1/chat/completions"]
CHAT_ENDPOINT: EndpointPath = "/v1/chat/completions"
COMPLETIONS_ENDPOINT: EndpointPath = "/v1/completions"
# `--goodput ttft:500 tpot:50` (vLLM's spelling) leaves `tpot:50` as an extra argument; we collect it.
CONTEXT_SETTINGS = {"allow_extra_args": True}


@dataclass(frozen=True)
class ServeBenchmarkConfig:
    """Everything one `afd bench serve` run needs; validated on construction (ConfigError)."""

    base_url: str
    """Server root, e.g. http://127.0.0.1:8000 (the endpoint path is appended)."""
    endpoint: EndpointPath = COMPLETIONS_ENDPOINT
    """Completions get token-id prompts; chat gets random-word messages."""
    model: str | None = None
    """Model name sent in requests; None: the first model of GET /v1/models."""
    num_prompts: int = 100
    """Requests in the run."""
    request_rate: float = math.inf
    """Mean requests per second; inf sends every request at time 0."""
    burstiness: float = 1.0
    """Gamma shape of the inter-arrival times: 1 Poisson, < 1 burstier, > 1 more even (vLLM's meaning)."""
    max_concurrency: int | None = None
    """Most requests in flight at once; None: unbounded."""
    random_input_len: int = 128
    """Prompt tokens per request (the mean when random_range_ratio > 0)."""
    random_output_len: int = 64
    """Generated tokens per request (max_tokens, with ignore_eos)."""
    random_range_ratio: float = 0.0
    """Lengths are uniform in [len·(1-r), len·(1+r)], 0 <= r < 1."""
    seed: int = 0
    """Seed of the prompts and of the arrival schedule."""
    vocab_size: int | None = None
    """Token ids are drawn below it; None: from the server when it says, else DEFAULT_VOCAB_SIZE."""
    goodput: Mapping[str, float] | None = None
    """SLOs in milliseconds by metric (ttft, tpot, e2el); goodput counts requests meeting all of them."""
    metric_percentiles: tuple[float, ...] = (99.0,)
    """Percentiles reported for every latency metric."""
    percentile_metrics: tuple[str, ...] = LATENCY_METRICS
    """Latency metrics shown in the printed block (the JSON always has all of them)."""
    api_key: str | None = None
    """Sent as `Authorization: Bearer KEY` (vLLM's --api-key on the server side)."""
    ignore_eos: bool = True
    """Ask the server to generate max_tokens tokens even past an end-of-sequence token."""
    temperature: float | None = None
    """Sampling temperature sent with each request; None: the server's default."""
    request_timeout_s: float = 600.0
    """Longest wait for the response or its next chunk before the request counts as failed."""
    cluster_poll_interval_s: float = 1.0
    """How often GET /afd/v1/cluster is sampled during the run for per-role tokens/s."""
    show_progress: bool = False
    """Draw a progress bar on stderr."""
    label: str | None = None
    """Prefix of the default result file name (vLLM's --label); None: the backend name."""
    save_result: bool = False
    """Write the result JSON to result_dir / result_filename."""
    result_dir: Path | None = None
    """Directory of the result file; None: the current directory."""
    result_filename: str | None = None
    """Result file name; None: {label}-{rate}qps[-concurrency{C}]-{model}-{date}.json like vLLM."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in (COMPLETIONS_ENDPOINT, CHAT_ENDPOINT):
            raise ConfigError(f"endpoint must be {COMPLETIONS_ENDPOINT} or {CHAT_ENDPOINT}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not (self.request_timeout_s > 0 and self.cluster_poll_interval_s > 0):
            raise ConfigError("request_timeout_s and cluster_poll_interval_s must be > 0")
        unknown = set(self.percentile_metrics) - set(LATENCY_METRICS)
        if unknown:
            raise ConfigError(f"unknown percentile metrics {sorted(unknown)}; use {', '.join(LATENCY_METRICS)}")
        parse_percentiles(",".join(str(p) for p in self.metric_percentiles))
        parse_goodput([f"{name}:{ms}" for name, ms in (self.goodput or {}).items()])
        check_workload(self.num_prompts, self.random_input_len, self.random_output_len, self.random_range_ratio)
        check_arrivals(self.request_rate, self.burstiness)

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def backend(self) -> str:
        """vLLM's backend name for the endpoint."""
        return "openai-chat" if self.endpoint == CHAT_ENDPOINT else "openai"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _payload(config: ServeBenchmarkConfig, model: str, request: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.expected_output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": config.ignore_eos,
    }
    if config.endpoint == CHAT_ENDPOINT:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if config.temperature is not None:
        payload["temperature"] = config.temperature
    return payload


@dataclass
class _Progress:
    """A rich progress bar on stderr, or nothing."""

    total: int
    enabled: bool
    failed: int = 0
    _bar: Progress | None = field(default=None, init=False)
    _task: Any = field(default=None, init=False)

    def __enter__(self) -> _Progress:
        if self.enabled:
            columns = (BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"))
            self._bar = Progress(
                TextColumn("serve"), *columns, TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)
            )
            self._bar.start()
            self._task = self._bar.add_task("serve", total=self.total, failed=0)
        return self

    def advance(self, output: RequestOutput) -> None:
        self.failed += not output.success
        if self._bar is not None:
            self._bar.update(self._task, advance=1, failed=self.failed)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


async def _poll_cluster(
    client: httpx.AsyncClient, config: ServeBenchmarkConfig, stop: asyncio.Event, samples: list[ClusterSnapshot]
) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=config.cluster_poll_interval_s)
        if not stop.is_set() and (snapshot := await fetch_cluster(client, config.root, config.headers())) is not None:
            samples.append(snapshot)


async def _drive(
    config: ServeBenchmarkConfig,
    client: httpx.AsyncClient,
    model: str,
    requests: list[SampleRequest],
    on_done: Callable[[RequestOutput], None],
) -> tuple[list[RequestOutput], float]:
    """Send `requests` on the arrival schedule under the concurrency cap; (outputs in order, duration s)."""
    offsets = arrival_offsets(len(requests), config.request_rate, config.burstiness, config.seed)
    limiter = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    url, chat = config.root + config.endpoint, config.endpoint == CHAT_ENDPOINT
    origin = time.perf_counter()

    async def one(request: SampleRequest) -> RequestOutput:
        async with limiter:
            output = await send_streaming_request(client, url, _payload(config, model, request), request, chat, origin)
        on_done(output)
        return output

    tasks = []
    for request, offset in zip(requests, offsets, strict=True):
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    outputs = await asyncio.gather(*tasks)
    return list(outputs), time.perf_counter() - origin


async def _discover(client: httpx.AsyncClient, config: ServeBenchmarkConfig) -> tuple[str, dict[str, Any]]:
    """(model name, its /v1/models entry or {})."""
    body, why = await get_json(client, config.root + "/v1/models", config.headers())
    listed = body.get("data") if isinstance(body, dict) else None
    entries = [e for e in listed if isinstance(e, dict) and "id" in e] if isinstance(listed, list) else []
    if config.model is not None:
        return config.model, next((e for e in entries if e["id"] == config.model), {})
    if not entries:
        raise PeerError(config.root, f"GET /v1/models gave no model ({why or 'empty list'}); pass --model")
    return str(entries[0]["id"]), entries[0]


def _positive_int(entry: Mapping[str, Any], key: str) -> int | None:
    value = entry.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _prompts(config: ServeBenchmarkConfig, vocab_size: int) -> list[SampleRequest]:
    lengths = (config.num_prompts, config.random_input_len, config.random_output_len, config.random_range_ratio)
    if config.endpoint == CHAT_ENDPOINT:
        return random_word_requests(*lengths, config.seed)
    return random_token_requests(*lengths, vocab_size, config.seed)


async def arun_serve_benchmark(config: ServeBenchmarkConfig) -> dict[str, Any]:
    """`run_serve_benchmark` for callers already inside an event loop."""
    timeout = httpx.Timeout(config.request_timeout_s, connect=min(30.0, config.request_timeout_s))
    # Unbounded pool: the semaphore is the only cap, so the client never queues requests on its own.
    # trust_env=False: a proxy picked up from the environment would be measured instead of the server.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits, headers=config.headers(), trust_env=False) as client,
        httpx.AsyncClient(timeout=10.0, trust_env=False) as side_client,
    ):
        model, model_entry = await _discover(side_client, config)
        cluster = await fetch_cluster(side_client, config.root, config.headers())
        vocab_size = config.vocab_size or (cluster and cluster.vocab_size) or _positive_int(model_entry, "vocab_size")
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        requests = _prompts(config, vocab_size)
        max_model_len = _positive_int(model_entry, "max_model_len")
        longest = max(r.prompt_len + r.expected_output_len for r in requests)
        if max_model_len and longest > max_model_len:
            raise ConfigError(
                f"prompt + output up to {longest} tokens exceeds the model's max_model_len {max_model_len}"
            )
        samples: list[ClusterSnapshot] = []
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_cluster(side_client, config, stop, samples)) if cluster else None
        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            with _Progress(len(requests), config.show_progress) as progress:
                outputs, duration = await _drive(config, client, model, requests, progress.advance)
        finally:
            stop.set()
            if poller is not None:
                await poller
        if cluster and not samples and (last := await fetch_cluster(side_client, config.root, config.headers())):
            samples.append(last)  # a run shorter than one poll interval: sample once at its end
    result = _result_header(config, model, date, vocab_size) | {"duration": duration}
    result |= compute_metrics(outputs, duration, config.metric_percentiles, config.goodput)
    result |= {
        "topology": cluster_topology(cluster) if cluster else None,
        "per_role_tokens_per_s": role_rates(samples),
        "ffn_busy_fraction": ffn_busy(samples),
        "hardware": hardware_summary(cluster),
    }
    if config.save_result:
        path = result_path(config, result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def run_serve_benchmark(config: ServeBenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark against `config.base_url` and return the result dict (the JSON that is saved).

    Failed requests are counted (`failed`, `errors`), never raised; `completed == 0` means all failed.
    Raises ConfigError for impossible settings and PeerError when the model cannot be discovered.
    """
    return asyncio.run(arun_serve_benchmark(config))


def _json_number(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _result_header(config: ServeBenchmarkConfig, model: str, date: str, vocab_size: int) -> dict[str, Any]:
    return {
        "date": date,
        "endpoint_type": config.backend,
        "backend": config.backend,
        "label": config.label,
        "model_id": model,
        "tokenizer_id": None,  # no client tokenizer: token counts are the server's usage numbers
        "num_prompts": config.num_prompts,
        "request_rate": _json_number(config.request_rate),
        "burstiness": _json_number(config.burstiness),
        "max_concurrency": config.max_concurrency,
        "endpoint": config.endpoint,
        "random_input_len": config.random_input_len,
        "random_output_len": config.random_output_len,
        "random_range_ratio": config.random_range_ratio,
        "seed": config.seed,
        "vocab_size": vocab_size,
        "goodput_slos_ms": dict(config.goodput) if config.goodput else None,
    }


def result_path(config: ServeBenchmarkConfig, result: Mapping[str, Any]) -> Path:
    """Where a saved result goes: result_dir / (result_filename or vLLM's default name)."""
    concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
    model = str(result["model_id"]).rstrip("/").split("/")[-1]
    name = config.result_filename or (
        f"{config.label or config.backend}-{result['request_rate']}qps{concurrency}-{model}-{result['date']}.json"
    )
    return (config.result_dir or Path.cwd()) / name


class Endpoint(str, Enum):
    completions = COMPLETIONS_ENDPOINT
    chat = CHAT_ENDPOINT


def command(
    ctx: typer.Context,
    base_url: Annotated[str, typer.Option(help="Server root URL (the API is under /v1).")] = "http://127.0.0.1:8000",
    endpoint: Annotated[Endpoint, typer.Option(help="OpenAI endpoint to load.")] = Endpoint.completions,
    model: Annotated[str | None, typer.Option(help="Model name; default: the first of GET /v1/models.")] = None,
    num_prompts: Annotated[int, typer.Option(help="Number of requests.")] = 100,
    request_rate: Annotated[
        float, typer.Option(help="Requests/s (Poisson/gamma arrivals); inf: all at once.")
    ] = math.inf,
    burstiness: Annotated[float, typer.Option(help="Gamma shape of arrivals: 1 Poisson, <1 burstier.")] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Most requests in flight at once.")] = None,
    random_input_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 128,
    random_output_len: Annotated[int, typer.Option(help="Generated tokens per request.")] = 64,
    random_range_ratio: Annotated[float, typer.Option(help="Lengths uniform in len·[1-r, 1+r].")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of prompts and arrivals.")] = 0,
    vocab_size: Annotated[int | None, typer.Option(help="Token ids are drawn below this.")] = None,
    goodput: Annotated[
        list[str] | None, typer.Option(help="SLOs KEY:MS (ttft, tpot, e2el), e.g. ttft:500 tpot:50.")
    ] = None,
    metric_percentiles: Annotated[str, typer.Option(help="Comma-separated percentiles, e.g. 50,90,99.")] = "99",
    percentile_metrics: Annotated[
        str, typer.Option(help="Metrics printed: ttft,tpot,itl,e2el.")
    ] = "ttft,tpot,itl,e2el",
    api_key: Annotated[str | None, typer.Option(help="Bearer token for the server.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; default: the server's.")] = None,
    request_timeout: Annotated[float, typer.Option(help="Seconds to wait for a response chunk.")] = 600.0,
    label: Annotated[str | None, typer.Option(help="Prefix of the result file name.")] = None,
    disable_tqdm: Annotated[bool, typer.Option("--disable-tqdm", help="No progress bar.")] = False,
    save_result: Annotated[bool, typer.Option("--save-result", help="Write the result JSON.")] = False,
    result_dir: Annotated[Path | None, typer.Option(help="Directory of the result JSON.")] = None,
    result_filename: Annotated[str | None, typer.Option(help="File name of the result JSON.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON line on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the TTFT and ITL distributions (CDFs).")] = None,
) -> None:
    """Load an OpenAI-compatible server (AFD router, vLLM, ...) and report like `vllm bench serve`.

    With --json, stdout carries exactly one JSON line and the human-readable block goes to stderr.
    """
    if ctx.args and not goodput:
        raise typer.BadParameter(f"unexpected arguments {ctx.args}")
    try:
        config = ServeBenchmarkConfig(
            base_url=base_url,
            endpoint=CHAT_ENDPOINT if endpoint is Endpoint.chat else COMPLETIONS_ENDPOINT,
            model=model,
            num_prompts=num_prompts,
            request_rate=request_rate,
            burstiness=burstiness,
            max_concurrency=max_concurrency,
            random_input_len=random_input_len,
            random_output_len=random_output_len,
            random_range_ratio=random_range_ratio,
            seed=seed,
            vocab_size=vocab_size,
            goodput=parse_goodput([*(goodput or []), *ctx.args]) or None,
            metric_percentiles=parse_percentiles(metric_percentiles),
            percentile_metrics=tuple(m.strip() for m in percentile_metrics.split(",") if m.strip()),
            api_key=api_key,
            temperature=temperature,
            request_timeout_s=request_timeout,
            show_progress=not disable_tqdm and sys.stdout.isatty(),
            label=label,
            save_result=save_result,
            result_dir=result_dir,
            result_filename=result_filename,
        )
        arrivals = "Poisson process" if burstiness == 1.0 else "gamma distribution"
        typer.echo(f"Traffic request rate: {request_rate}; burstiness {burstiness} ({arrivals})", err=True)
        typer.echo(f"Maximum request concurrency: {max_concurrency}", err=True)
        result = run_serve_benchmark(config)
    except AfdError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2 if isinstance(error, ConfigError) else 1) from None
    errors = [(index, message) for index, message in enumerate(result["errors"]) if message]
    for index, message in errors[:10]:
        typer.echo(f"request {index} failed: {message}", err=True)
    if result["completed"]:
        block = format_result_block(result, config.metric_percentiles, config.percentile_metrics)
        typer.echo(block, err=json_output)
    if save_result:
        typer.echo(f"result saved to {result_path(config, result)}", err=True)
    if plot is not None and result["completed"]:
        try:
            typer.echo(f"latency plot written to {plot_latency_distributions(result, plot)}", err=True)
        except AfdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(result))
    if not result["completed"]:
        typer.echo(f"error: all {result['failed']} requests failed; first error: {errors[0][1]}", err=True)
        raise typer.Exit(1)
