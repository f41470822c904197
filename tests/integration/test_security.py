"""Hostile peers on 127.0.0.1: unauthenticated, oversized gRPC messages are refused before they are read;
a gloo pair store is bound to the node's host and refuses a pairing without the pair's secret; a node
without a cluster token does not start unless told `--insecure`."""

from __future__ import annotations

from pathlib import Path

import grpc

from afd.model_spec import ModelSpec
from afd.wire import grpc_data
from afd.wire.auth import ClusterAuth
from tests.cluster_helpers import TEST_TOKEN, launch_ffn_server, write_token_file
from tests.engines import uneven_placement

MIB = 2**20


def _memory_kib(pid: int, field: str) -> int:
    """A `VmHWM`/`VmRSS` line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _send_unauthenticated(address: str, messages: int, size: int) -> list[grpc.StatusCode]:
    """A bidirectional Exchange carrying `messages` x `size` bytes, then as many unary calls of `size`
    bytes, all without a token: their status codes.

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
        unary = channel.unary_unary("/afd.v1.FfnNode/Status")
        for _ in range(messages):
            try:
                unary(payload, timeout=30)
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
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * (1 + messages)
        grown_mib = (_memory_kib(node.pid, "VmHWM") - before) / 1024
        # 6 x 64 MiB were sent; reading even one of them would raise the peak by 64 MiB
        assert grown_mib < 32, f"the node's peak RSS grew by {grown_mib:.0f} MiB for refused calls"
        # and the node still serves its members
        with ClusterAuth(token=TEST_TOKEN).channel(node.address) as member:
            from afd.wire.generated import afd_cluster_pb2 as pb
            from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc

            assert pb_grpc.FfnNodeStub(member).Status(pb.StatusRequest(), timeout=10).node_id == "ffn-0"
    finally:
        node.stop()
