"""`afd bench ...`: each benchmark module in benchmarks/ provides its own typer command function."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from afd.builtin_model import builtin_model_dir
from benchmarks import engine, load_memory, mix, serve, transport
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from orchestration.testbed.launch import launch_mix

bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks: engine, transport, serve, cluster, soak, load-memory, mix."
)
bench_app.command("engine")(engine.command)
bench_app.command("serve", context_settings=serve.CONTEXT_SETTINGS)(serve.command)
bench_app.command("transport")(transport.command)
bench_app.command("load-memory")(load_memory.command)
bench_app.command("mix")(mix.make_command(launch_mix))


@bench_app.command("cluster")
def cluster_command(
    model: Annotated[Path | None, typer.Option(help="Checkpoint; the built-in demo model if omitted.")] = None,
    ffn: Annotated[int, typer.Option(min=1, help="FFN nodes / shards.")] = 2,
    num_prompts: Annotated[int, typer.Option(min=1)] = 32,
    input_len: Annotated[int, typer.Option(min=1)] = 32,
    output_len: Annotated[int, typer.Option(min=1)] = 32,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
    microbatches: Annotated[str, typer.Option(help="Comma-separated microbatch counts to compare.")] = "1,2,3",
    transport: Annotated[str, typer.Option(help="Cluster data plane: grpc, gloo or shm.")] = "grpc",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads per attention/FFN process; cores / nodes if omitted.")
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="Rounds of engine + every m, alternating the sides; medians with min-max.")
    ] = 1,
    trace_exchanges: Annotated[
        Path | None,
        typer.Option(
            help="Folder for per-process traces of every exchange (channel transports); prints each hop's time."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Only JSON lines.")] = False,
) -> None:
    """`afd up` processes under `afd bench serve` vs the single-process engine, for several microbatch counts."""
    from afd.exchange_trace import ENV as TRACE_ENV
    from afd.model_spec import ModelSpec
    from benchmarks.cluster import ClusterBenchConfig, report, run

    model_dir = model or builtin_model_dir()
    counts = tuple(int(m) for m in microbatches.split(","))
    if trace_exchanges is not None and transport == "grpc":
        raise typer.BadParameter("exchange traces time the channel transports (shm, gloo), not grpc")
    started = itertools.count()

    @contextmanager
    def start(m: int) -> Iterator[str]:
        if trace_exchanges is not None:  # inherited by every node process the launcher starts
            os.environ[TRACE_ENV] = str(trace_exchanges / f"m{m}" / f"cluster-{next(started)}")
        cluster = LocalCluster(
            LocalClusterConfig(
                model=model_dir,
                ffn=ffn,
                microbatches=str(m),
                http_port=0,
                transport=transport,
                dtype=dtype,
                threads_per_node=threads,
            )
        )
        try:
            cluster.start()
            yield cluster.base_url
        finally:
            cluster.stop()
            cluster.remove_workdir()
            os.environ.pop(TRACE_ENV, None)

    config = ClusterBenchConfig(
        model_dir, ffn, num_prompts, input_len, output_len, concurrency, counts, dtype, threads=threads, repeats=repeats
    )
    rows, context = run(config, start, ModelSpec.from_pretrained(model_dir).vocab_size)
    if trace_exchanges is not None:
        from benchmarks.exchange_trace import analyze_rounds

        context["exchange_hops"] = {m: analyze_rounds(trace_exchanges / f"m{m}") for m in counts}
    report(rows, context, json_output)


@bench_app.command("soak")
def soak_command(
    minutes: Annotated[float, typer.Option(help="How long the load runs.")] = 5.0,
    base_url: Annotated[
        str | None, typer.Option(help="Load a running server (http://host:port); else start `afd up` for the soak.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint of the started cluster; the built-in model if omitted.")
    ] = None,
    attn: Annotated[int, typer.Option(min=1, help="Attention nodes of the started cluster.")] = 1,
    ffn: Annotated[int, typer.Option(min=1, help="FFN nodes of the started cluster.")] = 2,
    transport: Annotated[str, typer.Option(help="Data plane of the started cluster: grpc, gloo or shm.")] = "grpc",
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
    output_len: Annotated[int, typer.Option(min=1, help="Tokens per request (ignore_eos).")] = 32,
    interval_s: Annotated[float, typer.Option(help="Seconds per row of the report.")] = 60.0,
    request_timeout_s: Annotated[float, typer.Option(help="A request not answered by then is hung.")] = 120.0,
    api_key_file: Annotated[Path | None, typer.Option(help="API key of the server, for --base-url.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Only the JSON line.")] = False,
) -> None:
    """Steady greedy load: per-interval success, p99, RSS of every process; KV and running requests at the end."""
    from benchmarks.soak import SoakConfig, report, run_soak

    api_key = api_key_file.read_text().strip() if api_key_file is not None else None

    def soak(url: str, process_ids: Callable[[], dict[str, int]] | None) -> dict[str, Any]:
        config = SoakConfig(
            url,
            minutes=minutes,
            concurrency=concurrency,
            output_len=output_len,
            request_timeout_s=request_timeout_s,
            interval_s=interval_s,
            api_key=api_key,
        )
        return run_soak(config, process_ids)

    if base_url is not None:
        report(soak(base_url.rstrip("/"), None), json_output)
        return
    cluster = LocalCluster(LocalClusterConfig(model=model, attn=attn, ffn=ffn, transport=transport, http_port=0))
    try:
        cluster.start()
        result = soak(cluster.base_url, lambda: _cluster_pids(cluster))
    finally:
        cluster.stop()
        cluster.remove_workdir()
    report(result, json_output)


def _cluster_pids(cluster: LocalCluster) -> dict[str, int]:
    pids = {node_id: handle.process.pid for node_id, handle in cluster.nodes.items() if handle.process.poll() is None}
    if cluster.router is not None:
        pids["router"] = cluster.router.process.pid
    return pids
