"""A node without the cluster token (or with a wrong one, or without the cluster's certificate) is refused."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from afd.wire.auth import ClusterAuth, TlsFiles
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from ffn_nodes.server import FfnServerConfig
from ffn_nodes.shard import FfnShard
from tests.cluster_helpers import TEST_TOKEN, ffn_server_in_thread, launch_ffn_server, write_token_file
from tests.engines import uneven_placement


def dense_request(spec: ModelSpec) -> FfnRequest:
    return FfnRequest(layer=1, hidden=torch.randn(3, spec.hidden_size))  # layer 1 of qwen3_moe is dense


def test_token_is_required_on_every_call_but_health(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    node = launch_ffn_server(directory, "ffn-0", placement, tmp_path, token_file=write_token_file(tmp_path))
    try:
        node.wait_ready()
        with grpc.insecure_channel(node.address) as anonymous:
            # Kubernetes probes carry no token
            health = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.FfnNodeStub(anonymous).Status(pb.StatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ClusterAuth(token="a-wrong-token-of-enough-length").channel(node.address) as wrong:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.FfnNodeStub(wrong).Status(pb.StatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ClusterAuth(token=TEST_TOKEN).channel(node.address) as member:
            assert pb_grpc.FfnNodeStub(member).Status(pb.StatusRequest(), timeout=10).node_id == "ffn-0"

        # the data plane: refused without / with a wrong token, naming the peer; served with it
        request = dense_request(spec)
        for auth in (ClusterAuth(), ClusterAuth(token="a-wrong-token-of-enough-length")):
            config = GrpcTransportConfig(timeout_s=10, auth=auth)
            with GrpcTransport.for_model(spec, {"ffn-0": node.address}, config) as transport:
                with pytest.raises(PeerError, match="UNAUTHENTICATED") as caught:
                    transport.combine(transport.dispatch({"ffn-0": request}))
                assert caught.value.peer == "ffn-0"
        config = GrpcTransportConfig(timeout_s=10, auth=ClusterAuth(token=TEST_TOKEN))
        with GrpcTransport.for_model(spec, {"ffn-0": node.address}, config) as transport:
            partial = transport.combine(transport.dispatch({"ffn-0": request}))["ffn-0"]
        expected = FfnShard.load(directory, placement, "ffn-0").compute(request)
        torch.testing.assert_close(partial, expected, atol=1e-5, rtol=1e-5)
    finally:
        node.stop()


def make_certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it (EC keys: fast). Returns cert, key, ca."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / f"{name}-{part}" for part in ("ca.key", "ca.pem", "key", "csr", "pem"))
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["-out", cert, "-days", "1", "-extfile", ext]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", f"/CN={name}-ca"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", *sign],
    ]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    return cert, key, ca


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_mutual_tls_refuses_a_client_without_the_cluster_certificate(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    cert, key, ca = make_certificates(tmp_path / "cluster", "cluster")
    outsider_cert, outsider_key, _ = make_certificates(tmp_path / "outsider", "outsider")
    cluster_tls = TlsFiles(cert, key, ca)
    auth = ClusterAuth(token=TEST_TOKEN, tls=cluster_tls)
    with ffn_server_in_thread(FfnServerConfig(directory, "ffn-0", placement, auth=auth)) as server:
        address = f"localhost:{server.port}"
        with auth.channel(address) as member:
            assert pb_grpc.FfnNodeStub(member).Status(pb.StatusRequest(), timeout=10).node_id == "ffn-0"
        outsider = ClusterAuth(token=TEST_TOKEN, tls=TlsFiles(outsider_cert, outsider_key, ca))
        with outsider.channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.FfnNodeStub(channel).Status(pb.StatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
        with grpc.insecure_channel(address) as plaintext, pytest.raises(grpc.RpcError):
            pb_grpc.FfnNodeStub(plaintext).Status(pb.StatusRequest(), timeout=10)
        config = GrpcTransportConfig(timeout_s=10, auth=auth)
        with GrpcTransport.for_model(spec, {"ffn-0": address}, config) as transport:
            request = dense_request(spec)
            partial = transport.combine(transport.dispatch({"ffn-0": request}))["ffn-0"]
            assert server.shard is not None
            torch.testing.assert_close(partial, server.shard.compute(request), atol=1e-5, rtol=1e-5)
