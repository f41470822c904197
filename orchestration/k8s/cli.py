"""`afd k8s render|apply|scale|status|delete|overlays|kustomize`: an AFD cluster on Kubernetes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from afd.errors import AfdError
from orchestration.k8s.config import ClusterConfig, load_cluster_config

if TYPE_CHECKING:
    from orchestration.k8s.client import ClusterClient

k8s_app = typer.Typer(
    no_args_is_help=True, help="Run an AFD cluster on Kubernetes: render, apply, scale, status, delete."
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Cluster config YAML (see examples/cluster.yaml).")]
OverlayOption = Annotated[
    str | None, typer.Option("--overlay", help="Hardware preset applied to the config (`afd k8s overlays` lists them).")
]
KubeconfigOption = Annotated[
    Path | None, typer.Option("--kubeconfig", help="Kubeconfig file; default $KUBECONFIG, ~/.kube/config, in-cluster.")
]
ContextOption = Annotated[str | None, typer.Option("--context", help="Kubeconfig context; default the current one.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(error: AfdError) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _load(path: Path) -> ClusterConfig:
    try:
        return load_cluster_config(path)
    except AfdError as error:
        raise _fail(error) from None


def _client(kubeconfig: Path | None, context: str | None) -> ClusterClient:
    try:
        from orchestration.k8s.client import ClusterClient
        from orchestration.k8s.kubeapi import connect
    except ImportError as error:  # render and kustomize work without the client; the API commands do not
        raise _fail(AfdError(f"{error.name or 'kubernetes'} is not installed: pip install 'afd[k8s]'")) from None
    return ClusterClient(connect(kubeconfig, context))


@k8s_app.command()
def render(
    config: ConfigOption,
    overlay: OverlayOption = None,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="plan.json of `afd plan -o`: its pools, sizes and microbatches.")
    ] = None,
) -> None:
    """Print the cluster's manifests as one YAML stream (pipe to `kubectl apply -f -`, or save)."""
    from orchestration.k8s.naming import token_secret_name
    from orchestration.k8s.overlays import render as render_cluster
    from orchestration.k8s.render import dump_manifests

    cluster = _load(config)
    try:
        if plan is not None:
            from afd.planning.plan_file import read_plan
            from orchestration.k8s.plan_pools import apply_plan

            cluster = apply_plan(cluster, read_plan(plan))
        manifests = render_cluster(cluster, overlay)
    except AfdError as error:
        raise _fail(error) from None
    header = (
        f"AFD cluster {cluster.name!r} ({config}{', overlay ' + overlay if overlay else ''}).\n"
        f"The pods mount Secret {token_secret_name(cluster)!r} (key cluster-token); `afd k8s apply` creates it, with\n"
        f"kubectl create it first: kubectl -n {cluster.namespace} create secret generic {token_secret_name(cluster)} "
        "--from-literal=cluster-token=$(openssl rand -hex 32)"
    )
    sys.stdout.write(dump_manifests(manifests, header))


@k8s_app.command()
def apply(
    config: ConfigOption,
    overlay: OverlayOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    create_namespace: Annotated[bool, typer.Option(help="Create the namespace when it does not exist.")] = False,
    prune: Annotated[bool, typer.Option(help="Delete objects of this cluster that the config no longer has.")] = True,
) -> None:
    """Create or update the cluster's objects (server-side apply as field manager `afd`)."""
    cluster = _load(config)
    console = Console()
    try:
        changes = _client(kubeconfig, context).apply(cluster, overlay, create_namespace=create_namespace, prune=prune)
    except AfdError as error:
        raise _fail(error) from None
    for change in changes:
        console.print(f"{change.kind.lower()}/{change.name} {change.action}", highlight=False)
    console.print(f"Watch it come up: afd k8s status --config {config}" + (f" --overlay {overlay}" if overlay else ""))


@k8s_app.command()
def scale(
    config: ConfigOption,
    pool: Annotated[str, typer.Option("--pool", help="`attn` or an FFN pool name from the config.")],
    replicas: Annotated[int, typer.Option("--replicas", help="New number of nodes in the pool (0 parks it).")],
    overlay: OverlayOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Scale one pool through its StatefulSet's /scale subresource; the other pools are left alone."""
    cluster = _load(config)
    try:
        result = _client(kubeconfig, context).scale(cluster, pool, replicas, overlay)
    except AfdError as error:
        raise _fail(error) from None
    console = Console()
    console.print(
        f"pool {result.pool} (statefulset/{result.workload}): {result.previous} -> {result.replicas} replicas",
        highlight=False,
    )
    if result.warning:
        console.print(f"[yellow]warning:[/] {result.warning}", highlight=False)


@k8s_app.command()
def status(
    config: ConfigOption,
    overlay: OverlayOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    json_output: JsonOption = False,
) -> None:
    """Desired and ready replicas of the router and of every pool."""
    cluster = _load(config)
    try:
        result = _client(kubeconfig, context).status(cluster, overlay)
    except AfdError as error:
        raise _fail(error) from None
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"AFD cluster {result.name} in namespace {result.namespace}")
    for column in ("pool", "role", "workload", "accelerator", "desired", "ready", "updated", "state"):
        table.add_column(column, justify="right" if column in ("desired", "ready", "updated") else "left")
    for workload in result.workloads:
        table.add_row(
            workload.pool, workload.role, f"{workload.kind.lower()}/{workload.name}", workload.accelerator,
            str(workload.desired), str(workload.ready), str(workload.updated), workload.state,
        )  # fmt: skip
    console = Console()
    console.print(table)
    token = "present" if result.token_secret_present else "absent (apply creates it)"
    console.print(f"cluster token: secret/{result.token_secret} {token}", highlight=False)
    if result.autoscaler:
        console.print(f"autoscaler: {result.autoscaler}", highlight=False)
    console.print(f"OpenAI API: {result.api_url} (Service type {result.service_type})", highlight=False)


@k8s_app.command()
def delete(config: ConfigOption, kubeconfig: KubeconfigOption = None, context: ContextOption = None) -> None:
    """Delete every object this cluster created (found by its ownership labels); nothing else."""
    cluster = _load(config)
    try:
        changes = _client(kubeconfig, context).delete(cluster)
    except AfdError as error:
        raise _fail(error) from None
    console = Console()
    for change in changes:
        console.print(f"{change.kind.lower()}/{change.name} deleted", highlight=False)
    if not changes:
        console.print(f"nothing of cluster {cluster.name!r} in namespace {cluster.namespace}", highlight=False)


@k8s_app.command()
def overlays() -> None:
    """List the overlays (hardware presets) of --overlay."""
    from orchestration.k8s.overlays import OVERLAYS

    for overlay in OVERLAYS.values():
        print(f"{overlay.name:20} {overlay.description}")


@k8s_app.command()
def schema() -> None:
    """Print the JSON schema of cluster.yaml (for editor completion and validation)."""
    print(json.dumps(ClusterConfig.model_json_schema(by_alias=True), indent=2))


@k8s_app.command()
def kustomize(
    config: ConfigOption,
    out: Annotated[Path, typer.Option("--out", help="Directory to write base/, overlays/ and examples/ into.")],
    check: Annotated[bool, typer.Option(help="Only report files that differ; exit 1 when any does.")] = False,
) -> None:
    """Write the kustomize base, overlays and examples generated from the config (deploy/k8s)."""
    from orchestration.k8s.kustomize import kustomize_tree, stale_files, write_tree

    cluster = _load(config)
    tree = kustomize_tree(cluster, config.as_posix())
    if check:
        stale = stale_files(tree, out)
        for path in stale:
            print(f"stale: {out / path}")
        raise typer.Exit(1 if stale else 0)
    for path in write_tree(tree, out):
        print(f"wrote {out / path}")
