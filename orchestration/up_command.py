"""`afd up`, `afd scale`, `afd status`, `afd down`: a cluster on this machine (or on Ray with --ray)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, Protocol

import httpx
import typer
from rich.console import Console

from afd.errors import AfdError
from orchestration.lifeline import ProcessRecord, read_records, start_ticks, stop_recorded
from orchestration.local_cluster import LocalCluster, LocalClusterConfig, pool_devices, state_path
from orchestration.status_view import cluster_table, router_fetcher, write_expert_heatmap
from orchestration.status_view import watch as watch_cluster

console = Console()
DOWN_ANSWER_TIMEOUT_S = 10.0
"""How long `afd down` waits for the launcher to acknowledge before stopping the processes itself."""


class Launcher(Protocol):
    """What the control endpoint needs from a launcher (local processes or Ray actors)."""

    api_url: str

    def scale(self, attn: int | None = None, ffn: int | None = None) -> None: ...

    def cluster(self) -> dict[str, Any]: ...


class ControlServer:
    """127.0.0.1 endpoint through which `afd scale/status/down` reach the running `afd up`."""

    def __init__(self, launcher: Launcher, stop: threading.Event) -> None:
        self.secret = secrets.token_urlsafe(24)
        launcher_ref, secret = launcher, self.secret

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the console for the launcher's own output
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {secret}":
                    self._reply(401, {"error": "bad control secret"})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorized() and self.path == "/status":
                    self._reply(200, launcher_ref.cluster())

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/scale":
                    try:
                        launcher_ref.scale(body.get("attn"), body.get("ffn"))
                    except AfdError as exc:
                        self._reply(400, {"error": str(exc)})
                        return
                    self._reply(200, launcher_ref.cluster())
                elif self.path == "/down":
                    self._reply(200, {"stopping": True})
                    stop.set()
                else:
                    self._reply(404, {"error": f"no such control path {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="afd-control", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _state(name: str) -> dict[str, Any]:
    path = state_path(name)
    if not path.is_file():
        console.print(f"[red]error:[/red] no running cluster named {name!r} (start one with `afd up`)")
        raise typer.Exit(2)
    return json.loads(path.read_text())


def _recorded_processes(state: dict[str, Any]) -> list[ProcessRecord]:
    """What the cluster's launcher started and still runs (from its work directory), the launcher last."""
    records: list[ProcessRecord] = []
    if state.get("workdir"):
        try:
            records = read_records(Path(state["workdir"]))
        except ValueError as exc:
            console.print(f"[yellow]warning:[/yellow] {exc}")
    launcher = state.get("launcher")
    if launcher:
        records.append(ProcessRecord("launcher", int(launcher["pid"]), int(launcher["start_ticks"])))
    ordered = [r for r in records if r.name != "launcher"] + [r for r in records if r.name == "launcher"][-1:]
    return [r for r in ordered if r.alive()]


def _launcher_alive(name: str) -> bool:
    """Whether a cluster `name` is running; removes the state file of one whose processes are all gone."""
    path = state_path(name)
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    try:
        httpx.get(state["control_url"] + "/status", headers={"Authorization": f"Bearer {state['secret']}"}, timeout=2)
        return True
    except httpx.HTTPError:
        if _recorded_processes(state):  # a stuck launcher, or nodes left behind: `afd down` stops them
            return True
        path.unlink(missing_ok=True)
        return False


def _control(name: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    state = _state(name)
    headers = {"Authorization": f"Bearer {state['secret']}"}
    try:
        response = httpx.request(method, state["control_url"] + path, json=body, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] the launcher of {name!r} does not answer ({exc}); is `afd up` running?")
        raise typer.Exit(2) from exc
    if response.status_code != 200:
        console.print(f"[red]error:[/red] {response.json().get('error', response.text)}")
        raise typer.Exit(2)
    return response.json()


def print_cluster(view: dict[str, Any]) -> None:
    console.print(cluster_table(view))


def up(
    model: Annotated[
        Path | None, typer.Option(help="HF checkpoint directory; the built-in demo model if omitted.")
    ] = None,
    attn: Annotated[int, typer.Option(help="Attention nodes.")] = 1,
    ffn: Annotated[int, typer.Option(help="FFN nodes.")] = 2,
    transport: Annotated[str, typer.Option(help="Data plane: grpc, gloo, shm, or nccl (GPU pools).")] = "grpc",
    microbatches: Annotated[str, typer.Option(help="auto or a number of ping-pong microbatches.")] = "auto",
    host: Annotated[str, typer.Option(help="Interface every process binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="OpenAI API port (0 = any free).")] = 8000,
    api_key_file: Annotated[Path | None, typer.Option(help="File with the API key clients must send.")] = None,
    max_request_body_bytes: Annotated[
        int | None, typer.Option(min=1, help="HTTP request bodies above this get a 413 (router default 2 MiB).")
    ] = None,
    protect_metrics: Annotated[bool, typer.Option(help="Require the API key on /metrics too.")] = False,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template file used instead of the checkpoint's (as in vLLM).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per node (default: cores / nodes).")] = None,
    name: Annotated[str, typer.Option(help="Cluster name for afd scale/status/down.")] = "default",
    demo: Annotated[bool, typer.Option(help="Run a short serving benchmark against the cluster, then stop.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run the nodes as Ray actors.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (local Ray when omitted).")] = None,
    plan: Annotated[
        Path | None, typer.Option(help="plan.json of `afd plan -o`: its --attn, --ffn and --microbatches.")
    ] = None,
    expert_replication: Annotated[
        str, typer.Option(help="on|off: the router replicates hot experts on FFN nodes with spare capacity.")
    ] = "off",
    wire_dtype: Annotated[
        str, typer.Option(help="Hidden states to FFN nodes: fp8 (e4m3, a scale per token), bf16, auto (model dtype).")
    ] = "auto",
    attn_device: Annotated[
        str,
        typer.Option(
            help="Device of the attention nodes: cpu, cuda (several GPUs: round-robin), cuda:N, or a list "
            "cuda:0,cuda:1 the nodes take in turn; any torch device string."
        ),
    ] = "cpu",
    ffn_device: Annotated[str, typer.Option(help="Device of the FFN nodes, as --attn-device.")] = "cpu",
) -> None:
    """Start a router, attention nodes and FFN nodes; serve the OpenAI API until Ctrl-C."""
    if expert_replication not in ("on", "off"):
        console.print(f"[red]error:[/red] --expert-replication takes on or off, not {expert_replication!r}")
        raise typer.Exit(2)
    if expert_replication == "on" and ray:
        console.print("[red]error:[/red] --expert-replication on is not passed to Ray actors; use it without --ray")
        raise typer.Exit(2)
    if wire_dtype not in ("auto", "bf16", "fp8"):
        console.print(f"[red]error:[/red] --wire-dtype takes auto, bf16 or fp8, not {wire_dtype!r}")
        raise typer.Exit(2)
    if wire_dtype != "auto" and ray:
        console.print("[red]error:[/red] --wire-dtype is not passed to Ray actors; use it without --ray")
        raise typer.Exit(2)
    if plan is not None:
        from orchestration.plan_command import up_settings_from_plan

        attn, ffn, microbatches = up_settings_from_plan(plan, console)
    if chat_template is not None and ray:
        # The file is on this machine and the router actor may be on another; refuse rather than ignore it.
        console.print("[red]error:[/red] --chat-template is not passed to Ray actors; use it without --ray")
        raise typer.Exit(2)
    if chat_template is not None and not chat_template.is_file():
        console.print(f"[red]error:[/red] --chat-template {chat_template}: no such file")
        raise typer.Exit(2)
    try:
        if ray:  # the actors' machines have the devices, not necessarily this one: what Ray can reserve only
            from orchestration.ray_cluster import ray_device

            devices = {
                "attn": [ray_device(attn_device, "--attn-device")],
                "ffn": [ray_device(ffn_device, "--ffn-device")],
            }
        else:
            devices = {
                "attn": pool_devices(attn_device, "--attn-device"),
                "ffn": pool_devices(ffn_device, "--ffn-device"),
            }
    except AfdError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if _launcher_alive(name):
        console.print(f"[red]error:[/red] a cluster named {name!r} is already running; `afd down` it first")
        raise typer.Exit(2)
    try:
        config = LocalClusterConfig(
            model=model,
            attn=attn,
            ffn=ffn,
            transport=transport,
            microbatches=microbatches,
            host=host,
            http_port=port,
            api_key_file=api_key_file,
            max_request_body_bytes=max_request_body_bytes,
            protect_metrics=protect_metrics,
            chat_template=chat_template,
            threads_per_node=threads,
            expert_replication=expert_replication == "on",
            wire_dtype=wire_dtype,
            attn_device=",".join(devices["attn"]),
            ffn_device=",".join(devices["ffn"]),
        )
    except AfdError as exc:  # e.g. --transport nccl with a pool on the CPU, --attn 0
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    launcher: Any
    if ray:
        from orchestration.ray_cluster import RayCluster

        launcher = RayCluster(config, address=ray_address)
    else:
        launcher = LocalCluster(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` of the launcher still stops every node
    control = ControlServer(launcher, stop)
    try:
        on = f"attention on {config.attn_device}, FFN on {config.ffn_device}"
        with console.status(f"starting router + {attn} attention + {ffn} FFN nodes ({on}) ..."):
            launcher.start()
        control.start()
        path = state_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"control_url": control.url, "secret": control.secret, "api_url": launcher.api_url}
        # what `afd down` needs when this launcher cannot answer: its own identity and its work directory
        # (processes.json there lists what it started)
        me = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())}
        state |= {"workdir": str(launcher.workdir), "launcher": me}
        path.write_text(json.dumps(state))
        path.chmod(0o600)
        print_cluster(launcher.cluster())
        console.print(f"OpenAI API: [bold]{launcher.api_url}[/bold]   (node logs: {launcher.workdir})")
        if demo:
            _demo(launcher, api_key_file)
            return
        console.print("serving; Ctrl-C stops every process (or run `afd down`)")
        while not stop.wait(0.5):
            pass
    except AfdError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        control.stop()
        state_path(name).unlink(missing_ok=True)
        launcher.stop()


def _demo(launcher: Any, api_key_file: Path | None) -> None:
    from benchmarks.serve import ServeBenchmarkConfig, run_serve_benchmark
    from benchmarks.serve_metrics import format_result_block

    config = ServeBenchmarkConfig(
        base_url=launcher.api_url.removesuffix("/v1"),
        num_prompts=16,
        max_concurrency=8,
        random_input_len=32,
        random_output_len=32,
        api_key=api_key_file.read_text().strip() if api_key_file else None,
    )
    result = run_serve_benchmark(config)
    console.print(format_result_block(result, config.metric_percentiles, config.percentile_metrics))


def scale(
    attn: Annotated[int | None, typer.Option(help="Attention nodes wanted.")] = None,
    ffn: Annotated[int | None, typer.Option(help="FFN nodes wanted.")] = None,
    name: Annotated[str, typer.Option(help="Cluster name.")] = "default",
) -> None:
    """Add or remove nodes of a running cluster, live."""
    if attn is None and ffn is None:
        raise typer.BadParameter("give --attn and/or --ffn")
    print_cluster(_control(name, "POST", "/scale", {"attn": attn, "ffn": ffn}))


def _status_fetcher(name: str) -> Callable[[], dict[str, Any]]:
    """GET /status of the launcher of cluster `name`; a failure raises AfdError, so that --watch can retry."""
    state = _state(name)  # no such cluster: a clear error before any live view starts
    headers = {"Authorization": f"Bearer {state['secret']}"}

    def fetch() -> dict[str, Any]:
        try:
            response = httpx.get(state["control_url"] + "/status", headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            raise AfdError(f"the launcher of {name!r} does not answer ({exc}); is `afd up` running?") from None
        if response.status_code != 200:
            raise AfdError(f"the launcher of {name!r} answered {response.status_code}: {response.text}")
        return response.json()

    return fetch


def status(
    name: Annotated[str, typer.Option(help="Cluster name.")] = "default",
    json_output: Annotated[bool, typer.Option("--json", help="Print the router's JSON view.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Live view, refreshed until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between --watch refreshes.")] = 2.0,
    iterations: Annotated[int, typer.Option(help="Stop --watch after N refreshes (0: until Ctrl-C).")] = 0,
    expert_heatmap: Annotated[
        Path | None, typer.Option(help="Write a PNG heatmap of tokens per expert and FFN node.")
    ] = None,
    router: Annotated[
        str | None, typer.Option(help="Read this router's /afd/v1/cluster (URL) instead of `afd up`'s cluster.")
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="API key of --router, if it requires one.")] = None,
) -> None:
    """Every node: role, hardware, state, load, KV use, FFN busy fraction, experts held."""
    if router is not None:
        fetch = router_fetcher(router, api_key_file.read_text().strip() if api_key_file else None)
    else:
        fetch = _status_fetcher(name)
    try:
        if expert_heatmap is not None:
            path = write_expert_heatmap(fetch(), expert_heatmap)
            console.print(f"expert heatmap written to {path}")
        if watch:
            watch_cluster(fetch, interval, iterations, console)
        elif expert_heatmap is None:
            view = fetch()
            if json_output:
                print(json.dumps(view))
            else:
                print_cluster(view)
    except (AfdError, httpx.HTTPError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def down(name: Annotated[str, typer.Option(help="Cluster name.")] = "default") -> None:
    """Stop a running cluster (every process its `afd up` started), even one whose launcher is gone."""
    state = _state(name)
    headers = {"Authorization": f"Bearer {state['secret']}"}
    try:
        response = httpx.post(state["control_url"] + "/down", headers=headers, timeout=DOWN_ANSWER_TIMEOUT_S)
        if response.status_code == 200:
            console.print(f"cluster {name!r} is stopping")
            return
        reason = f"it answered {response.status_code}"
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    console.print(f"the launcher of {name!r} does not answer ({reason}); stopping its processes by pid")
    recorded = _recorded_processes(state)
    # the nodes and the router first, by pid; then the stuck launcher (it would otherwise stop them itself)
    stopped = stop_recorded([r for r in recorded if r.name != "launcher"])
    stopped += stop_recorded([r for r in recorded if r.name == "launcher"])
    state_path(name).unlink(missing_ok=True)
    names = ", ".join(f"{r.name} (pid {r.pid})" for r in stopped) or "nothing was still running"
    console.print(f"cluster {name!r} stopped: {names}")
