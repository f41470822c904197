"""`afd bench ...`: each benchmark module in benchmarks/ provides its own typer command function."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from afd.builtin_model import builtin_model_dir
from benchmarks import engine, serve, transport
from orchestration.local_cluster import LocalCluster, LocalClusterConfig

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: engine, transport, serve.")
bench_app.command("engine")(engine.command)
bench_app.command("serve", context_settings=serve.CONTEXT_SETTINGS)(serve.command)
bench_app.command("transport")(transport.command)


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
    json_output: Annotated[bool, typer.Option("--json", help="Only JSON lines.")] = False,
) -> None:
    """`afd up` processes under `afd bench serve` vs the single-process engine, for several microbatch counts."""
    from afd.model_spec import ModelSpec
    from benchmarks.cluster import ClusterBenchConfig, report, run

    model_dir = model or builtin_model_dir()
    counts = tuple(int(m) for m in microbatches.split(","))

    @contextmanager
    def start(m: int) -> Iterator[str]:
        cluster = LocalCluster(
            LocalClusterConfig(
                model=model_dir, ffn=ffn, microbatches=str(m), http_port=0, transport=transport, dtype=dtype
            )
        )
        try:
            cluster.start()
            yield cluster.base_url
        finally:
            cluster.stop()
            cluster.remove_workdir()

    config = ClusterBenchConfig(model_dir, ffn, num_prompts, input_len, output_len, concurrency, counts, dtype)
    rows, context = run(config, start, ModelSpec.from_pretrained(model_dir).vocab_size)
    report(rows, context, json_output)
