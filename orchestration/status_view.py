"""`afd status` views of the router's cluster view: the node table, a live view (`--watch`), the expert-load heatmap.

All three read the same JSON (the router's /afd/v1/cluster, directly or through `afd up`'s control endpoint):
per node its role, device, state, load, KV use, FFN busy fraction and experts held, and per FFN node the tokens
it computed for each expert. The FFN nodes report those counts summed over layers (every node holds the same
experts in every layer), so the heatmap's rows are FFN nodes, not layers: it shows which experts are hot and
which replica of a hot expert took its load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from afd.errors import AfdError, ConfigError

View = dict[str, Any]
MIN_INTERVAL_S = 0.1
"""Fastest `--watch` refresh: each refresh is one HTTP request to the router."""


def expert_ranges(experts: list[int]) -> str:
    """Sorted expert ids as compact ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    ids = sorted(experts)
    runs: list[list[int]] = []
    for expert in ids:
        if runs and expert == runs[-1][1] + 1:
            runs[-1][1] = expert
        else:
            runs.append([expert, expert])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _device(node: dict[str, Any]) -> str:
    """ "NVIDIA H200, 140.4 GiB", "cpu (8 threads), 31.2 GiB", "cpu x2": the name the node reports, how many, and
    the memory of one (a tenth of a GiB: 80 GB and 80 GiB cards differ by 5.5 GiB; whole GiB without ".0")."""
    kind = str(node.get("device_kind") or "cpu")
    count = int(node.get("device_count") or 1)
    memory = int(node.get("device_memory_bytes") or 0)
    text = kind if count == 1 else f"{kind} x{count}"
    return f"{text}, {f'{memory / 2**30:.1f}'.removesuffix('.0')} GiB" if memory else text


def _share(value: float, warn: float = 0.9) -> Text:
    return Text(f"{value:.0%}", style="red" if value >= warn else "")


_ROLES = {"attention": "attn"}
"""Short role names for the table (the JSON keeps the full ones)."""


def cluster_table(view: View) -> Table:
    """One row per node: role, state, device, load, KV use, FFN busy fraction, experts held (replicas of hot
    experts after a "+"), tokens/s."""
    # No vertical rules, short headers and fixed narrow columns: the table still reads on an 80-column terminal.
    table = Table(
        title=f"AFD cluster — {view.get('model')}, placement v{view.get('placement_version')}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    numbers = ("KV", "busy", "tok/s")
    for column in ("node", "role", "state", "device", "load", *numbers[:2], "experts", numbers[2]):
        fixed = column in ("node", "role", "state", *numbers)
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=fixed)
    for node in sorted(view.get("nodes", []), key=lambda n: (n["role"], n["node_id"])):
        experts = node.get("experts") or []
        held = f"{len(experts)} ({expert_ranges(experts)})" if experts else "-"
        replicas = node.get("replicas") or []
        if replicas:  # "6 (4-7 +0,1)": its own share, then the hot experts it holds replicas of
            own = [e for e in experts if e not in set(replicas)]
            held = f"{len(experts)} ({expert_ranges(own) or '-'} +{','.join(map(str, sorted(replicas)))})"
        kv: Text | str = "-"
        busy: Text | str = "-"
        if node["role"] == "attention":
            load = f"{node.get('num_running', 0)} run, {node.get('num_waiting', 0)} wait"
            if node.get("microbatches") is not None:
                load += f", m={node['microbatches']}"
            kv = _share(float(node.get("kv_cache_usage", 0.0)))
        elif node["role"] == "ffn":
            load = ""
            busy = _share(float(node.get("busy_fraction", 0.0)))
        else:
            load = ""
        table.add_row(
            node["node_id"],
            _ROLES.get(node["role"], node["role"]),
            node["state"],
            _device(node),
            load,
            kv,
            busy,
            held,
            str(node.get("tokens_per_s", "")),
        )
    return table


def watch_frame(view: View | None, error: str | None, interval_s: float, refreshed_at: float) -> RenderableType:
    """What one refresh of `afd status --watch` shows: the table (the last good one while the router is away)."""
    parts: list[RenderableType] = []
    if view is not None:
        parts.append(cluster_table(view))
    stamp = time.strftime("%H:%M:%S", time.localtime(refreshed_at))
    if error:
        parts.append(Text(f"{stamp}  router unreachable: {error}", style="red"))
    parts.append(Text(f"{stamp}  refreshing every {interval_s:g} s; Ctrl-C to stop", style="dim"))
    return Group(*parts)


def watch(
    fetch: Callable[[], View],
    interval_s: float,
    iterations: int = 0,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Redraw the node table every `interval_s` until Ctrl-C, `stop` is set, or `iterations` refreshes (0: no bound).

    A failed fetch (router restarting, network) shows the error under the last table and the next refresh tries
    again. Returns the number of refreshes; Ctrl-C ends it cleanly (the caller exits 0).
    """
    if not interval_s >= MIN_INTERVAL_S:
        raise ConfigError(f"--interval must be at least {MIN_INTERVAL_S} s, got {interval_s}")
    if iterations < 0:
        raise ConfigError(f"--iterations must be >= 0 (0 = until Ctrl-C), got {iterations}")
    stop = stop or threading.Event()
    view: View | None = None
    done = 0
    # auto_refresh off: the screen changes only when a new view arrives, not 4 times a second.
    with Live(console=console, auto_refresh=False, transient=False) as live:
        try:
            while not stop.is_set():
                error = None
                try:
                    view = fetch()
                except (httpx.HTTPError, AfdError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                live.update(watch_frame(view, error, interval_s, time.time()), refresh=True)
                done += 1
                if iterations and done >= iterations:
                    break
                stop.wait(interval_s)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends; the last frame stays on screen
    return done


def router_fetcher(base_url: str, api_key: str | None = None) -> Callable[[], View]:
    """A fetch of the router's own /afd/v1/cluster (a router started by `afd node router`, or on Kubernetes)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    root = base_url.rstrip("/").removesuffix("/v1")

    def fetch() -> View:
        response = httpx.get(f"{root}/afd/v1/cluster", headers=headers, timeout=5)
        response.raise_for_status()
        return response.json()

    return fetch


def expert_load_matrix(view: View) -> tuple[list[str], list[list[int]]]:
    """(FFN node ids, tokens[node][expert]) from the view's expert_load; every expert of the model a column."""
    num_experts = int(view.get("num_experts") or 0)
    load: dict[str, dict[str, int]] = view.get("expert_load") or {}
    if num_experts <= 0:
        raise AfdError("the cluster view has no routed experts (a dense model, or no expert placement yet)")
    rows = sorted(load)
    matrix = [[0] * num_experts for _ in rows]
    for row, node_id in zip(matrix, rows, strict=True):
        for expert, count in load[node_id].items():
            if not 0 <= int(expert) < num_experts:
                raise AfdError(f"expert {expert} of {node_id} is outside the model's {num_experts} experts")
            row[int(expert)] = int(count)
    return rows, matrix


def write_expert_heatmap(view: View, path: Path) -> Path:
    """PNG heatmap of tokens per expert (columns) and FFN node (rows), with the per-expert total on top.

    Raises AfdError when the router has no expert counts yet (no tokens served since it started).
    """
    rows, matrix = expert_load_matrix(view)
    if not rows or not any(any(row) for row in matrix):
        raise AfdError("the router has no expert token counts yet; serve some requests and try again")
    try:
        from matplotlib.figure import Figure  # Figure + savefig use the Agg canvas: no display, no pyplot state
    except ImportError:
        raise AfdError("--expert-heatmap needs matplotlib: pip install 'afd[plot]'") from None
    totals = [sum(column) for column in zip(*matrix, strict=True)]
    num_experts = len(totals)
    figure = Figure(figsize=(max(6.0, num_experts * 0.12 + 2), 1.6 + 0.4 * len(rows)), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1, max(1, len(rows))])
    top.bar(range(num_experts), totals, width=1.0, color="tab:orange")
    top.set_ylabel("tokens")
    top.set_title(f"Expert load, placement v{view.get('placement_version')} (tokens summed over layers)")
    image = bottom.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    bottom.set_yticks(range(len(rows)), rows)
    bottom.set_xlabel("expert")
    bottom.set_ylabel("FFN node")
    figure.colorbar(image, ax=bottom, label="tokens")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
