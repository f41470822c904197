"""The local launcher: router, attention and FFN nodes as processes on this machine.

`afd up` owns the processes: it starts them, adds and removes nodes on `afd scale`, and stops every one
of them (by its own handle) on Ctrl-C or `afd down`. Other commands reach the launcher through a small
control endpoint on 127.0.0.1 whose address and secret are kept in a state file under the user cache.
Nodes authenticate to each other with a cluster token generated for this launch.

The processes never outlive the launcher: each holds the read end of the launcher's lifeline pipe and
stops itself when the launcher is gone (orchestration/lifeline.py). Their pids and start times are
kept in `processes.json` in the work directory, so `afd down` can stop them when the launcher is stuck.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afd.builtin_model import builtin_model_dir, cache_root
from afd.devices import parse_device_list
from afd.errors import AfdError, ConfigError
from afd.wire.auth import read_token_file
from orchestration.lifeline import LAUNCHER_FD_ENV, ProcessRecord, write_records
from orchestration.router_view import cluster_view, wait_until_ready
from router.microbatch_plan import parse_microbatches

log = logging.getLogger("afd.launcher")


@dataclass(frozen=True)
class LocalClusterConfig:
    """What `afd up` starts."""

    model: Path | None = None
    """Checkpoint directory; the built-in demo model when None."""
    attn: int = 1
    """Attention nodes."""
    ffn: int = 2
    """FFN nodes."""
    transport: str = "grpc"
    """Data plane between attention and FFN nodes: grpc, gloo, shm, or nccl (both pools on cuda)."""
    microbatches: str = "auto"
    """Microbatches per step: auto (router's plan) or a number."""
    host: str = "127.0.0.1"
    """Interface every process binds."""
    http_port: int = 8000
    """OpenAI API port; 0 picks a free one."""
    served_model_name: str | None = None
    """Model name in the API."""
    api_key_file: Path | None = None
    """File with the API key clients must send (open API when None)."""
    max_request_body_bytes: int | None = None
    """HTTP request bodies above this get a 413 (the router's default when None)."""
    protect_metrics: bool = False
    """Require the API key on /metrics too."""
    chat_template: Path | None = None
    """Jinja chat template file the router uses instead of the checkpoint's (local processes only)."""
    threads_per_node: int | None = None
    """torch threads per attention/FFN process; cores / nodes when None."""
    dtype: str = "auto"
    """Compute dtype of the nodes."""
    start_timeout_s: float = 180.0
    """How long nodes may take to load and register."""
    expert_replication: bool = False
    """Let the router replicate hot experts on FFN nodes with spare capacity (`--expert-replication on`)."""
    replication_interval_s: float = 10.0
    """Seconds between the router's re-plans of hot-expert replicas (when expert_replication)."""
    wire_dtype: str = "auto"
    """Hidden states on the attention->FFN wire: auto (model dtype), bf16 or fp8 (`--wire-dtype`)."""
    attn_device: str = "cpu"
    """Device of the attention nodes (`--attn-device`): cpu, cuda, cuda:N, any torch device string, or a comma
    list (cuda:0,cuda:1) whose devices the pool's nodes take in turn. A bare accelerator type (cuda) spreads
    the pool's nodes over every such device present, round-robin (see pool_devices)."""
    ffn_device: str = "cpu"
    """Device of the FFN nodes (`--ffn-device`), as attn_device."""

    def __post_init__(self) -> None:
        if self.attn < 1 or self.ffn < 1:
            raise ConfigError(f"need at least one attention and one FFN node, got --attn {self.attn} --ffn {self.ffn}")
        if self.transport not in ("grpc", "gloo", "shm", "nccl"):
            raise ConfigError(f"local transport must be grpc, gloo, shm or nccl, not {self.transport!r}")
        parse_microbatches(self.microbatches)  # refuse here, not in every node process
        if self.wire_dtype not in ("auto", "bf16", "fp8"):
            raise ConfigError(f"wire dtype must be auto, bf16 or fp8, not {self.wire_dtype!r}")
        # Only the spelling here: whether the devices are present is a question for the machine the nodes run
        # on (this one for LocalCluster.start, a Ray worker's for `afd up --ray`).
        types = {
            torch.device(name).type
            for option, text in (("--attn-device", self.attn_device), ("--ffn-device", self.ffn_device))
            for name in device_names(text, option)
        }
        if self.transport == "nccl" and types != {"cuda"}:
            raise ConfigError(
                "--transport nccl moves activations GPU to GPU: it needs --attn-device and --ffn-device on cuda, "
                f"got {self.attn_device} and {self.ffn_device} (grpc, gloo and shm work between any devices)"
            )


def device_names(text: str, option: str = "--device") -> list[str]:
    """The torch device strings of a comma list ("cuda:0, cuda:1" -> ["cuda:0", "cuda:1"]), spelling checked
    (torch.device parses each) but not presence; ConfigError naming `option` otherwise."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"{option} needs a device, e.g. cpu, cuda or cuda:0,cuda:1; got {text!r}")
    for name in names:
        try:
            torch.device(name)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"{option} {name!r} is not a torch device ({exc})") from None
    return names


def pool_devices(text: str, option: str = "--device") -> list[str]:
    """The devices present here that a pool's nodes take in turn, as `afd node --device` strings.

    "cpu" -> ["cpu"]; "cuda:1,cuda:0" -> ["cuda:1", "cuda:0"]; a bare accelerator type alone ("cuda") -> every
    device of that type present (["cuda:0", "cuda:1", ...]), so that the nodes of one pool spread over the GPUs
    instead of sharing the first. Raises ConfigError naming what was found when a device is not present."""
    names = device_names(text, option)
    try:
        devices = parse_device_list(",".join(names))
    except ConfigError as exc:  # parse_device names the option --device; here it is the pool's option
        raise ConfigError(str(exc).replace("--device", option, 1)) from None
    if len(names) == 1 and ":" not in names[0] and devices[0].type not in ("cpu", "meta"):
        count = getattr(getattr(torch, devices[0].type), "device_count", lambda: 1)()
        return [f"{devices[0].type}:{index}" for index in range(int(count))]
    return [str(device) for device in devices]


def next_device(devices: Sequence[str], in_use: Sequence[str]) -> str:
    """The device of a pool's next node: the one of `devices` that the fewest of its live nodes (`in_use`, their
    devices) compute on, the first such in list order: round-robin from a fresh start, and a node added after a
    scale-down goes where one left."""
    return min(devices, key=lambda device: (list(in_use).count(device), devices.index(device)))


@dataclass
class NodeHandle:
    node_id: str
    role: str
    process: subprocess.Popen
    log_path: Path
    device: str = "cpu"
    """The `--device` it computes on (attention and FFN nodes)."""


@dataclass
class LocalCluster:
    config: LocalClusterConfig
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="afd-cluster-")))
    nodes: dict[str, NodeHandle] = field(default_factory=dict)
    router: NodeHandle | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    _next_index: dict[str, int] = field(default_factory=lambda: {"attn": 0, "ffn": 0})
    _lifeline: tuple[int, int] | None = None
    """(read, write) ends of the lifeline pipe; children inherit only the read end."""
    _devices: dict[str, list[str]] = field(default_factory=dict)
    """Role -> the devices its nodes take in turn (pool_devices of the config's attn/ffn_device, at start)."""

    @property
    def api_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}/v1"

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}"

    # ---- processes -------------------------------------------------------------------------------------
    def _node_command(self, node_id: str, role: str, args: list[str]) -> list[str]:
        """The command line that starts one node (the mix testbed wraps it in a namespace and cgroups)."""
        return [sys.executable, "-m", "orchestration.cli", "node", role, *args]

    def _spawn(self, node_id: str, role: str, args: list[str]) -> NodeHandle:
        log_path = self.workdir / f"{node_id}.log"
        command = self._node_command(node_id, role, args)
        if self._lifeline is None:
            self._lifeline = os.pipe()  # both ends close-on-exec: only pass_fds hands the read end on
        read_end = self._lifeline[0]
        env = {**os.environ, LAUNCHER_FD_ENV: str(read_end)}
        with open(log_path, "wb") as out:
            # a session of its own: a Ctrl-C in the launcher's terminal reaches the launcher only, which
            # stops the nodes in order; the lifeline, not the session, ties the node to the launcher
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(read_end,), env=env
            )
        handle = NodeHandle(node_id, role, process, log_path)
        self._record(extra=[handle])
        return handle

    def _record(self, extra: Sequence[NodeHandle] = ()) -> None:
        """Write processes.json: the launcher and every process it started that still runs."""
        handles = [*([self.router] if self.router else []), *self.nodes.values(), *extra]
        records = [ProcessRecord.of("launcher", os.getpid())]
        records += [ProcessRecord.of(h.node_id, h.process.pid) for h in handles if h.process.poll() is None]
        write_records(self.workdir, [r for r in records if r is not None])

    def _threads(self) -> int:
        if self.config.threads_per_node:
            return self.config.threads_per_node
        return max(1, (os.cpu_count() or 1) // (self.config.attn + self.config.ffn))

    def start(self) -> None:
        config = self.config
        # before any process starts: a device that is not here is refused naming what is
        self._devices = {
            "attn": pool_devices(config.attn_device, "--attn-device"),
            "ffn": pool_devices(config.ffn_device, "--ffn-device"),
        }
        self.model = config.model or builtin_model_dir()
        token = self.workdir / "cluster-token"
        token.write_text(secrets.token_urlsafe(32))
        token.chmod(0o600)
        self.token_file = token
        self._start_router(config.http_port, 0)
        self.scale(config.attn, config.ffn)

    def _start_router(self, http_port: int, grpc_port: int) -> None:
        config = self.config
        ready = self.workdir / "router.json"
        ready.unlink(missing_ok=True)
        args = ["--model", str(self.model), "--host", config.host, "--http-port", str(http_port)]
        args += ["--grpc-port", str(grpc_port), "--cluster-token-file", str(self.token_file)]
        args += ["--ready-file", str(ready), "--microbatches", config.microbatches]
        if config.served_model_name:
            args += ["--served-model-name", config.served_model_name]
        if config.api_key_file:
            args += ["--api-key-file", str(config.api_key_file)]
        if config.max_request_body_bytes is not None:
            args += ["--max-request-body-bytes", str(config.max_request_body_bytes)]
        if config.protect_metrics:
            args += ["--protect-metrics"]
        if config.expert_replication:
            args += ["--expert-replication", "on", "--replication-interval", str(config.replication_interval_s)]
        if config.chat_template is not None:
            args += ["--chat-template", str(Path(config.chat_template).resolve())]
        self.router = self._spawn("router", "router", args)
        self._wait_file(ready, self.router)
        ports = json.loads(ready.read_text())
        self.http_port, self.grpc_port = ports["http_port"], ports["grpc_port"]

    def restart_router(self) -> None:
        """Start a new router on the same ports (after the old one died); the nodes register again."""
        assert self.router is not None and self.http_port is not None and self.grpc_port is not None
        if self.router.process.poll() is None:
            self.router.process.terminate()
        self.router.process.wait(30)
        self._start_router(self.http_port, self.grpc_port)
        self.wait_until_ready({h.node_id for h in self.nodes.values() if h.process.poll() is None})

    def _wait_file(self, path: Path, handle: NodeHandle) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while not (path.exists() and path.stat().st_size):
            if handle.process.poll() is not None:
                raise AfdError(f"{handle.node_id} exited with {handle.process.returncode}:\n{self.tail(handle)}")
            if time.monotonic() > deadline:
                raise AfdError(f"{handle.node_id} did not start within {self.config.start_timeout_s:.0f} s")
            time.sleep(0.05)

    def tail(self, handle: NodeHandle, lines: int = 20) -> str:
        try:
            return "\n".join(handle.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _add(self, role: str) -> NodeHandle:
        index = self._next_index[role]
        self._next_index[role] += 1
        node_id = f"{role}-{index}"
        config = self.config
        args = [
            "--model",
            str(self.model),
            "--router",
            f"{config.host}:{self.grpc_port}",
            "--node-id",
            node_id,
            "--host",
            config.host,
            "--port",
            "0",
            "--cluster-token-file",
            str(self.token_file),
            "--threads",
            str(self._threads()),
            "--dtype",
            config.dtype,
        ]
        if role == "attn":
            args += ["--transport", config.transport, "--microbatches", config.microbatches]
            args += ["--wire-dtype", config.wire_dtype]
        devices = self._devices.get(role) or ["cpu"]
        device = next_device(devices, [h.device for h in self._of_role(role)])
        if device != "cpu":  # cpu is the node's default: a CPU cluster's command lines stay as they were
            args += ["--device", device]
        handle = self._spawn(node_id, role, args)
        handle.device = device
        self.nodes[node_id] = handle
        return handle

    def _of_role(self, role: str) -> list[NodeHandle]:
        return [h for h in self.nodes.values() if h.role == role and h.process.poll() is None]

    def scale(self, attn: int | None = None, ffn: int | None = None) -> None:
        """Add or gracefully remove nodes until the pools have the requested sizes; waits until done."""
        if (attn is not None and attn < 1) or (ffn is not None and ffn < 1):
            raise ConfigError("each pool needs at least one node")
        started: list[NodeHandle] = []
        stopping: list[NodeHandle] = []
        for role, wanted in (("ffn", ffn), ("attn", attn)):
            if wanted is None:
                continue
            live = self._of_role(role)
            started += [self._add(role) for _ in range(wanted - len(live))]
            for handle in live[wanted:] if wanted < len(live) else []:
                handle.process.send_signal(signal.SIGTERM)  # the node drains and leaves by itself
                stopping.append(handle)
        if started:
            self.wait_until_ready({h.node_id for h in started})
        for handle in stopping:
            try:
                handle.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait()
            self.nodes.pop(handle.node_id, None)
        if stopping:
            self._record()

    @property
    def _api_key(self) -> str | None:
        return read_token_file(self.config.api_key_file) if self.config.api_key_file else None

    def cluster(self) -> dict[str, Any]:
        return cluster_view(self.base_url, self._api_key)

    def wait_until_ready(self, node_ids: set[str]) -> None:
        """Until every node in `node_ids` is ready in the router's view and the API answers health checks."""

        def check_alive() -> None:
            for node_id in node_ids:
                handle = self.nodes[node_id]
                if handle.process.poll() is not None:
                    raise AfdError(f"{node_id} exited with {handle.process.returncode}:\n{self.tail(handle)}")

        wait_until_ready(self.base_url, node_ids, self.config.start_timeout_s, check_alive, self._api_key)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process this launcher started: nodes first, then the router; idempotent."""
        for group in (list(self.nodes.values()), [self.router] if self.router else []):
            for handle in group:
                if handle.process.poll() is None:
                    handle.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for handle in group:
                try:
                    handle.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    handle.process.kill()
                    handle.process.wait()
        self.nodes.clear()
        self.router = None
        self._record()
        if self._lifeline is not None:
            for end in self._lifeline:
                os.close(end)
            self._lifeline = None

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def state_path(name: str = "default") -> Path:
    return cache_root() / "clusters" / f"{name}.json"
