"""The committed generated protobuf / gRPC modules match proto/afd_cluster.proto, and live inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from afd.wire import codegen


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    stale = [
        path.name
        for path in fresh
        if not (codegen.GENERATED_DIR / path.name).exists()
        or (codegen.GENERATED_DIR / path.name).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"{stale} are stale or missing: run `python -m afd.wire.codegen` (or `make proto`) and commit"


def test_stale_code_is_detected(tmp_path: Path) -> None:
    """The check above can fail: an edited .proto yields different code."""
    proto_dir = tmp_path / "proto"
    proto_dir.mkdir()
    source = (codegen.PROTO_DIR / "afd_cluster.proto").read_text()
    (proto_dir / "afd_cluster.proto").write_text(source.replace("bytes frame = 1;", "bytes frame = 1;\n  int32 x = 2;"))
    out = codegen.generate(tmp_path / "out", proto_dir=proto_dir)
    module = next(p for p in out if p.name == "afd_cluster_pb2.py")
    assert module.read_bytes() != (codegen.GENERATED_DIR / "afd_cluster_pb2.py").read_bytes()


def test_generated_modules_import_inside_the_package_only() -> None:
    # a clean interpreter: importing the services must not put afd_cluster_pb2 or proto on the top level
    code = (
        "import sys\n"
        "from afd.wire.generated import afd_cluster_pb2_grpc, afd_cluster_pb2\n"
        "assert 'afd_cluster_pb2' not in sys.modules, 'generated code imported as a top-level module'\n"
        "assert 'proto' not in sys.modules, 'generated code pulled in a top-level proto module'\n"
        "assert afd_cluster_pb2_grpc.afd__cluster__pb2 is afd_cluster_pb2\n"
        "print(afd_cluster_pb2.DataFrame(frame=b'ok').frame.decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=codegen.REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert not (codegen.PROTO_DIR / "__init__.py").exists(), "proto/ must not become an importable package"


def test_missing_proto_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(codegen.CodegenError, match="protoc failed"):
        codegen.generate(tmp_path / "out", proto_dir=tmp_path)
