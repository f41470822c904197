"""Hostile peers on 127.0.0.1: unauthenticated, oversized gRPC messages are refused before they are read;
a gloo pair store is bound to the node's host and refuses a pairing without the pair's secret; a node
without a cluster token does not start unless told `--insecure`."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroupGloo
from typer.testing import CliRunner

from afd.errors import PeerError
from afd.model_spec import ModelSpec
from afd.transport.channel import Channel
from afd.transport.gloo_channel import GlooStoreServer
from afd.wire import grpc_data
from afd.wire.auth import ClusterAuth
from orchestration.cli import app
from tests.cluster_helpers import READY_TIMEOUT_S, REPO_ROOT, TEST_TOKEN, launch_ffn_server, write_token_file
from tests.engines import uneven_placement

MIB = 2**20


def _memory_kib(pid: int, field: str) -> int:
    """A `VmHWM`/`VmRSS` line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _send_unauthenticated(address: str, messages: int, size: int) -> list[grpc.StatusCode]:
    """A bidirectional Exchange carrying `messages` x `size` bytes, then a unary call of `size` bytes, both
    without a token: their status codes.

    The blocking client, because grpc's asyncio client reports a write cut short by the server's status
    as INTERNAL when the two race (a 64 MiB write left unread by the server is cut short by design).
    """
    options = grpc_data.message_size_options(2 * size)
    codes: list[grpc.StatusCode] = []
    payload = b"\x0a" + b"\x00" * (size - 1)  # a DataFrame tag, then garbage: the size is what matters
    with grpc.insecure_channel(address, options=options) as channel:
        exchange = channel.stream_stream(grpc_data.METHOD)
        try:
            for _reply in exchange(iter([payload] * messages), timeout=30):
                pass
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
        try:
            channel.unary_unary("/afd.v1.FfnNode/Status")(payload, timeout=30)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


def test_unauthenticated_large_messages_are_refused_before_they_are_read(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    node = launch_ffn_server(
        directory, "ffn-0", uneven_placement(spec, 1), tmp_path, token_file=write_token_file(tmp_path)
    )
    try:
        node.wait_ready()
        before = _memory_kib(node.pid, "VmHWM")
        messages, size = 3, 64 * MIB
        codes = _send_unauthenticated(node.address, messages, size)
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2
        grown_mib = (_memory_kib(node.pid, "VmHWM") - before) / 1024
        # 4 x 64 MiB were offered. Reading one message costs at least its 64 MiB (about 110 MiB per call
        # before the fix: grpc's buffer plus the bytes handed to Python). What is left is grpc's HTTP/2
        # flow-control window per stream, which its bandwidth probing grows to a few MiB on loopback:
        # data the client may send before anyone reads, bounded per stream, not by the message.
        assert grown_mib < 48, f"the node's peak RSS grew by {grown_mib:.0f} MiB for refused calls"
        # and the node still serves its members
        with ClusterAuth(token=TEST_TOKEN).channel(node.address) as member:
            from afd.wire.generated import afd_cluster_pb2 as pb
            from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc

            assert pb_grpc.FfnNodeStub(member).Status(pb.StatusRequest(), timeout=10).node_id == "ffn-0"
    finally:
        node.stop()


# -- a node without a token --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["node", "router", "--http-port", "0", "--grpc-port", "0"],
        ["node", "attn", "--router", "127.0.0.1:1", "--node-id", "attn-0"],
        ["node", "ffn", "--router", "127.0.0.1:1", "--node-id", "ffn-0"],
    ],
    ids=["router", "attn", "ffn"],
)
def test_a_node_without_a_token_refuses_to_start(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no --cluster-token-file" in result.output and "--insecure" in result.output


def test_token_and_insecure_together_are_refused(tmp_path: Path) -> None:
    args = ["node", "router", "--insecure", "--cluster-token-file", str(write_token_file(tmp_path))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "not both" in result.output


def _spawn_node(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestration.cli", "node", *args],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        )


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = READY_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"not ready within {timeout} s:\n{log.read_text(errors='replace')}"
        time.sleep(0.1)
    return path.read_text()


def test_insecure_nodes_start_and_say_so_loudly(tmp_path: Path) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        router_ready, router_log = tmp_path / "router.json", tmp_path / "router.log"
        router_args = ["router", "--insecure", "--http-port", "0", "--grpc-port", "0", "--ready-file"]
        processes.append(_spawn_node([*router_args, str(router_ready)], router_log))
        ports = json.loads(_wait_for(router_ready, processes[0], router_log))
        ffn_ready, ffn_log = tmp_path / "ffn.ready", tmp_path / "ffn.log"
        ffn_args = ["ffn", "--insecure", "--router", f"127.0.0.1:{ports['grpc_port']}", "--node-id", "ffn-0"]
        processes.append(_spawn_node([*ffn_args, "--threads", "1", "--ready-file", str(ffn_ready)], ffn_log))
        _wait_for(ffn_ready, processes[1], ffn_log)
        for log in (router_log, ffn_log):
            assert "INSECURE: no cluster token" in log.read_text(errors="replace")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# -- the gloo pair store -------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_gloo_store_listens_on_the_node_host_only() -> None:
    store = GlooStoreServer("127.0.0.1")
    try:
        assert _listening_addresses(store.port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or [::]
    finally:
        store.close()


def test_gloo_pairing_without_the_secret_is_refused() -> None:
    """A third party on 127.0.0.1 that knows the store and the pair's prefix (a TCPStore lists its keys to
    anyone) takes the FFN rank: the attention end refuses the pair instead of sending it frames."""
    store = GlooStoreServer("127.0.0.1")
    listener = store.listener("ffn-0")
    fields = msgpack.unpackb(listener.rendezvous)
    accepted: list[object] = []

    def accept() -> None:
        try:
            accepted.append(listener.accept(20))
        except PeerError as exc:
            accepted.append(exc)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    client = dist.TCPStore(fields["host"], fields["port"], None, False, datetime.timedelta(seconds=20))
    options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = datetime.timedelta(seconds=20)
    impostor: Any = ProcessGroupGloo(dist.PrefixStore(fields["prefix"], client), 1, 2, options)
    try:
        # what it can send: anything but a proof keyed with the secret it never saw
        guess = torch.zeros(32, dtype=torch.uint8)
        sink = torch.zeros(32, dtype=torch.uint8)
        works = [impostor.send([guess], 0, 2), impostor.recv([sink], 0, 2)]
        acceptor.join(30)
        assert not acceptor.is_alive()
        assert len(accepted) == 1 and isinstance(accepted[0], PeerError), accepted
        assert "does not hold the pair's secret" in str(accepted[0])
        del works
    finally:
        for channel in accepted:
            if isinstance(channel, Channel):
                channel.close()
        del impostor
        store.close()
