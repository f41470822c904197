"""`afd node router|attn|ffn`: one cluster role per process (what every launcher starts)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from afd.builtin_model import builtin_model_dir
from afd.errors import AfdError, ConfigError
from afd.exchange_trace import install_from_env
from afd.wire.auth import ClusterAuth, read_token_file
from orchestration.lifeline import watch_launcher
from router.microbatch_plan import parse_microbatches

node_app = typer.Typer(no_args_is_help=True, help="Run one node of an AFD cluster (router, attention or FFN).")

ModelOption = Annotated[Path | None, typer.Option(help="HF checkpoint directory; the built-in demo model if omitted.")]
TokenOption = Annotated[Path | None, typer.Option(help="File holding the shared cluster token.")]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Run without a cluster token: anyone who can reach this node may join the cluster or send it work.",
    ),
]
ReadyOption = Annotated[Path | None, typer.Option(help="Write the bound port(s) here once serving.")]
MicrobatchOption = Annotated[str, typer.Option(help="Microbatches per step: auto (router's plan) or a number.")]
WireDTypeOption = Annotated[
    str,
    typer.Option(help="Hidden states to the FFN nodes: fp8 (e4m3, a scale per token), bf16, or auto (model dtype)."),
]

DeviceOption = Annotated[
    str,
    typer.Option(help="Compute device: cpu, cuda, cuda:N (ROCm too), or another torch device (xpu, npu, mps)."),
]


def _check_device(device: str) -> None:
    """Refuse a device this machine lacks before anything loads, naming what it has."""
    from afd.devices import parse_device

    try:
        parse_device(device)
    except AfdError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc


def _setup_process(name: str) -> None:
    """Log lines tagged with `name`; if a launcher started this process, exit when the launcher is gone."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    watch_launcher()  # started by `afd up`: stop when it is gone (a no-op when started by hand)
    install_from_env()  # `afd bench cluster --trace-exchanges`: time every exchange's hops (else nothing)


def _cluster_auth(token_file: Path | None, insecure: bool) -> ClusterAuth:
    """The node's ClusterAuth; exits (status 2) without a token unless `--insecure` says so explicitly.

    A node without a token accepts every caller: a Register of a fake attention node, prompts, data frames.
    Launchers (`afd up`, Ray, the k8s manifests) always pass a token; a node started by hand must too.
    """
    if token_file is not None and insecure:
        raise typer.BadParameter("give --cluster-token-file or --insecure, not both")
    if token_file is None and not insecure:
        typer.echo(
            "error: no --cluster-token-file given; refusing to start a node that accepts anyone. Pass the "
            "cluster's token file (the same one on every node), or --insecure to run unauthenticated anyway.",
            err=True,
        )
        raise typer.Exit(2)
    if insecure:
        logging.getLogger("afd.node").warning(
            "INSECURE: no cluster token - any process that can reach this node's ports can join the cluster, "
            "register nodes and send it work. Use --cluster-token-file outside single-user development."
        )
        return ClusterAuth()
    try:
        return ClusterAuth.from_config(token_file=token_file)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _microbatches(value: str) -> int | None:
    try:
        return parse_microbatches(value)
    except ConfigError as exc:
        raise typer.BadParameter(f"--{exc}") from None


def _run(coroutine: object) -> None:
    try:
        asyncio.run(coroutine)  # type: ignore[arg-type]
    except AfdError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@node_app.command("router")
def router_command(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="OpenAI API port (0 = any).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="Control-plane port nodes register on (0 = any).")] = 50051,
    served_model_name: Annotated[str | None, typer.Option(help="Model name in the API.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File with the API key clients must send.")] = None,
    cluster_token_file: TokenOption = None,
    insecure: InsecureOption = False,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit (default: the model's).")] = None,
    microbatches: MicrobatchOption = "auto",
    max_waiting: Annotated[int, typer.Option(help="Queued requests before 429.")] = 256,
    node_timeout: Annotated[float, typer.Option(help="Seconds without heartbeat before a node is dead.")] = 6.0,
    ready_file: ReadyOption = None,
    max_request_body_bytes: Annotated[
        int, typer.Option(min=1, help="HTTP request bodies above this get a 413 (default 2 MiB).")
    ] = 2 * 1024 * 1024,
    protect_metrics: Annotated[
        bool, typer.Option(help="Require the API key on /metrics too (open by default, as in vLLM).")
    ] = False,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template file used instead of the checkpoint's (as in vLLM).")
    ] = None,
    expert_replication: Annotated[
        str, typer.Option(help="on|off: replicate hot experts on FFN nodes with spare capacity.")
    ] = "off",
    replication_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between re-plans of the hot-expert replicas.")
    ] = 10.0,
) -> None:
    """The router: OpenAI API, admission, placement and membership."""
    if expert_replication not in ("on", "off"):
        raise typer.BadParameter(f"--expert-replication takes on or off, not {expert_replication!r}")
    from router.attention_pool import AdmissionConfig
    from router.controller import ControllerConfig
    from router.server import RouterConfig, run_router

    _setup_process("router")
    auth = _cluster_auth(cluster_token_file, insecure)
    config = RouterConfig(
        model=model or builtin_model_dir(),
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        served_model_name=served_model_name,
        api_key=read_token_file(api_key_file) if api_key_file else None,
        auth=auth,
        max_model_len=max_model_len,
        controller=ControllerConfig(
            node_timeout_s=node_timeout,
            microbatches=_microbatches(microbatches),
            expert_replication=expert_replication == "on",
            replication_interval_s=replication_interval,
        ),
        backend=AdmissionConfig(max_waiting=max_waiting),
        ready_file=ready_file,
        max_request_body_bytes=max_request_body_bytes,
        protect_metrics=protect_metrics,
        chat_template=chat_template,
    )
    _run(run_router(config))


@node_app.command("attn")
def attention_command(
    router: Annotated[str, typer.Option(help="Router control-plane address host:port.")],
    node_id: Annotated[str, typer.Option(help="Unique node id.")],
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any).")] = 0,
    advertise_host: Annotated[str | None, typer.Option(help="Host other nodes reach this one at.")] = None,
    transport: Annotated[str, typer.Option(help="Data plane: grpc, gloo, shm or nccl.")] = "grpc",
    microbatches: MicrobatchOption = "auto",
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    max_num_seqs: Annotated[int, typer.Option(help="Most requests running at once.")] = 64,
    kv_cache_gib: Annotated[float, typer.Option(help="KV cache memory.")] = 1.0,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    cluster_token_file: TokenOption = None,
    insecure: InsecureOption = False,
    ready_file: ReadyOption = None,
    wire_dtype: WireDTypeOption = "auto",
) -> None:
    """An attention node: KV cache, attention halves, sampling."""
    from attn_nodes.config import EngineConfig
    from attn_nodes.server import AttentionNodeConfig, run_attention_node

    _check_device(device)
    if wire_dtype not in ("auto", "bf16", "fp8"):
        raise typer.BadParameter(f"--wire-dtype takes auto, bf16 or fp8, not {wire_dtype!r}")
    _setup_process(node_id)
    auth = _cluster_auth(cluster_token_file, insecure)
    config = AttentionNodeConfig(
        model=model or builtin_model_dir(),
        router=router,
        node_id=node_id,
        host=host,
        port=port,
        advertise_host=advertise_host,
        transport=transport,  # type: ignore[arg-type]
        microbatches=_microbatches(microbatches),
        engine=EngineConfig(
            dtype=dtype,  # type: ignore[arg-type]
            max_num_seqs=max_num_seqs,
            kv_cache_gib=kv_cache_gib,
            wire_dtype=wire_dtype,  # type: ignore[arg-type]
            device=device,
        ),
        auth=auth,
        threads=threads,
        ready_file=ready_file,
    )
    _run(run_attention_node(config))


@node_app.command("ffn")
def ffn_command(
    node_id: Annotated[str, typer.Option(help="Unique node id.")],
    router: Annotated[
        str | None, typer.Option(help="Router control-plane address host:port; omit only with --placement-file.")
    ] = None,
    placement_file: Annotated[
        Path | None,
        typer.Option(help="Serve this ExpertPlacement (JSON) without a router (benchmarks, tests driving FFN nodes)."),
    ] = None,
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any).")] = 0,
    advertise_host: Annotated[str | None, typer.Option(help="Host attention nodes reach this one at.")] = None,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Most tokens computed together (M2N batching).")] = 16384,
    cluster_token_file: TokenOption = None,
    insecure: InsecureOption = False,
    ready_file: ReadyOption = None,
) -> None:
    """An FFN node: a shard of every layer's experts and MLP slices; returns partial sums."""
    import torch

    from afd.placement import ExpertPlacement
    from ffn_nodes.node import ClusterAttachment, run_ffn_node
    from ffn_nodes.server import FfnServerConfig

    if (router is None) == (placement_file is None):
        raise typer.BadParameter("give --router (join a cluster) or --placement-file (serve alone), exactly one")
    _check_device(device)
    if threads:
        torch.set_num_threads(threads)
    _setup_process(node_id)
    auth = _cluster_auth(cluster_token_file, insecure)
    placement = None
    if placement_file is not None:
        try:
            placement = ExpertPlacement.from_dict(json.loads(placement_file.read_text()))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read placement file {placement_file}: {exc}") from exc
    try:
        config = FfnServerConfig(
            model_dir=model or builtin_model_dir(),
            node_id=node_id,
            placement=placement,
            host=host,
            port=port,
            dtype=dtype,
            auth=auth,
            max_batch_tokens=max_batch_tokens,
            device=device,
        )
    except AfdError as exc:
        raise typer.BadParameter(str(exc)) from exc
    attachment = ClusterAttachment(router=router, advertise_host=advertise_host) if router is not None else None
    _run(run_ffn_node(config, attachment, ready_file))
