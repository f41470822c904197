"""Start and stop node processes for integration tests: every wait bounded, every process stopped by its handle.

servers = start_ffn_servers(model_dir, placement, tmp_path)        # all start in parallel
try:
    transport = GrpcTransport.for_model(spec, {s.node_id: s.address for s in servers}, ...)
    ...
finally:
    stop_all(servers)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from afd.model_spec import ModelSpec
from afd.node_lifecycle import read_ready_file
from afd.placement import ExpertPlacement
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from afd.wire.event_loop import EventLoopThread
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.server import FfnNodeServer, FfnServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0
"""Process start-up includes importing torch and loading the shard; generous for a loaded 2-core machine."""
TEST_TOKEN = "test-cluster-token-0123456789abcdef"


class ProcessStartError(RuntimeError):
    """A node process died or did not become ready in time (the message holds the tail of its log)."""


@dataclass
class NodeProcess:
    """A node process started by a test; stop() / kill() act on this handle only."""

    node_id: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    host: str = "127.0.0.1"
    port: int | None = None
    _log_handle: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.node_id} is not ready")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        """Wait for the ready file (the bound port); raises ProcessStartError if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = read_ready_file(self.ready_file)
            if ready is not None:
                self.port = int(ready["port"])
                return self.port
            if self.process.poll() is not None:
                raise ProcessStartError(
                    f"{self.node_id} exited with {self.process.returncode} before ready:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise ProcessStartError(f"{self.node_id} not ready within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL (what a crash looks like to peers) and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stays connected but never answers (a hung peer)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        handle = self._log_handle
        if handle is not None and hasattr(handle, "close"):
            handle.close()


def launch_ffn_server(
    model_dir: Path,
    node_id: str,
    placement: ExpertPlacement,
    work_dir: Path,
    token_file: Path | None = None,
    extra_args: Sequence[str] = (),
) -> NodeProcess:
    """Start `afd node ffn --placement-file ...` for `node_id`, without a router (returns at once; call wait_ready)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    placement_file = work_dir / f"placement-{node_id}.json"
    placement_file.write_text(json.dumps(placement.to_dict()))
    ready_file = work_dir / f"{node_id}.ready"
    ready_file.unlink(missing_ok=True)
    log_file = work_dir / f"{node_id}.log"
    command = [
        sys.executable,
        "-m",
        "orchestration.cli",
        "node",
        "ffn",
        "--model",
        str(model_dir),
        "--node-id",
        node_id,
        "--placement-file",
        str(placement_file),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ready-file",
        str(ready_file),
        *(["--cluster-token-file", str(token_file)] if token_file is not None else ["--insecure"]),
        *extra_args,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # tests run several processes on few cores
    handle = log_file.open("wb")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return NodeProcess(node_id, process, ready_file, log_file, _log_handle=handle)


def start_ffn_servers(
    model_dir: Path,
    placement: ExpertPlacement,
    work_dir: Path,
    token_file: Path | None = None,
    timeout: float = READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> list[NodeProcess]:
    """One FFN server per node of `placement`, started in parallel; all ready, or all stopped and an error."""
    nodes = [
        launch_ffn_server(model_dir, node, placement, work_dir, token_file, extra_args) for node in placement.nodes
    ]
    try:
        deadline = time.monotonic() + timeout
        for node in nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Iterable[NodeProcess]) -> None:
    for node in nodes:
        node.stop()


def write_token_file(directory: Path, token: str = TEST_TOKEN) -> Path:
    path = directory / "cluster-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def ffn_server_in_thread(config: FfnServerConfig, timeout: float = READY_TIMEOUT_S) -> Iterator[FfnNodeServer]:
    """An FfnNodeServer on a background event loop of this process (for tests that inspect its state)."""
    loop = EventLoopThread(f"ffn-server-{config.node_id}")
    loop.start()
    server = FfnNodeServer(config)
    try:
        loop.run(server.start(), timeout)
        yield server
    finally:
        with contextlib.suppress(Exception):
            loop.run(server.shutdown(), timeout)
        loop.stop()


@contextlib.contextmanager
def engine_over_grpc_ffn_processes(
    model_dir: Path, placement: ExpertPlacement, config: EngineConfig, work_dir: Path, ffn_dtype: str | None = None
) -> Iterator[AttentionEngine]:
    """An engine of this process whose FFN halves are `afd node ffn` processes of `placement` behind gRPC, in
    `ffn_dtype` (the engine's dtype when None); every process is stopped on exit."""
    spec = ModelSpec.from_pretrained(model_dir)
    servers = start_ffn_servers(model_dir, placement, work_dir, extra_args=["--dtype", ffn_dtype or config.dtype])
    try:
        peers = {server.node_id: server.address for server in servers}
        with GrpcTransport.for_model(spec, peers, GrpcTransportConfig(timeout_s=30)) as transport:
            transport.wait_ready()
            yield AttentionEngine.load(model_dir, transport, placement, config)
    finally:
        stop_all(servers)
