"""`afd k8s ...` end to end: kubeconfig resolution (--kubeconfig, --context, KUBECONFIG), output, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestration.k8s.cli import k8s_app
from orchestration.k8s.config import ClusterConfig
from orchestration.k8s.overlays import OVERLAYS, render
from tests.k8s.apiserver import RunningApiServer
from tests.k8s.conftest import DEPLOY, EXAMPLE_CONFIG, REPO

pytestmark = pytest.mark.k8s

RUNNER = CliRunner()
WIDE = {"COLUMNS": "250", "NO_COLOR": "1"}


def write_kubeconfig(path: Path, emulator_url: str) -> Path:
    """Two contexts: `emu` (the emulator) and `prod` (nothing listens there), `prod` current."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "emu", "cluster": {"server": emulator_url}},
                    {"name": "dead", "cluster": {"server": "http://127.0.0.1:1"}},
                ],
                "users": [{"name": "dev", "user": {"token": "kubeconfig-bearer-token"}}],
                "contexts": [
                    {"name": "emu", "context": {"cluster": "emu", "user": "dev"}},
                    {"name": "prod", "context": {"cluster": "dead", "user": "dev"}},
                ],
                "current-context": "prod",
            }
        )
    )
    return path


def write_config(path: Path, config: ClusterConfig) -> Path:
    path.write_text(config.to_yaml())
    return path


def test_apply_scale_status_delete_through_the_cli(
    tmp_path: Path, api_server: RunningApiServer, two_pool_config: ClusterConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    config = write_config(tmp_path / "cluster.yaml", two_pool_config)
    monkeypatch.delenv("KUBECONFIG", raising=False)

    args = ["--config", str(config), "--kubeconfig", str(kubeconfig), "--context", "emu"]
    applied = RUNNER.invoke(k8s_app, ["apply", *args, "--create-namespace"], env=WIDE)
    assert applied.exit_code == 0, applied.output
    assert "statefulset/afd-ffn-a100 created" in applied.output and "secret/afd-cluster-token created" in applied.output
    assert all(r.headers.get("Authorization") == "Bearer kubeconfig-bearer-token" for r in api_server.requests())

    scaled = RUNNER.invoke(k8s_app, ["scale", *args, "--pool", "ffn-l40s", "--replicas", "4"], env=WIDE)
    assert scaled.exit_code == 0, scaled.output
    assert "pool ffn-l40s (statefulset/afd-ffn-l40s): 2 -> 4 replicas" in scaled.output

    # KUBECONFIG instead of --kubeconfig, as kubectl users have it.
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    status = RUNNER.invoke(k8s_app, ["status", "--config", str(config), "--context", "emu", "--json"], env=WIDE)
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert [(w["pool"], w["desired"], w["ready"], w["state"]) for w in report["workloads"]] == [
        ("-", 1, 0, "progressing"), ("attn", 1, 0, "progressing"),
        ("ffn-l40s", 4, 0, "progressing"), ("ffn-a100", 3, 0, "progressing"),
    ]  # fmt: skip
    token = api_server.stored("", "v1", "secrets", "serving")["afd-cluster-token"]["stringData"]["cluster-token"]
    table = RUNNER.invoke(k8s_app, ["status", "--config", str(config), "--context", "emu"], env=WIDE)
    assert table.exit_code == 0, table.output
    assert (
        "statefulset/afd-ffn-l40s" in table.output and "cluster token: secret/afd-cluster-token present" in table.output
    )
    assert token not in status.output + table.output + applied.output

    deleted = RUNNER.invoke(k8s_app, ["delete", "--config", str(config), "--context", "emu"], env=WIDE)
    assert deleted.exit_code == 0, deleted.output
    assert "statefulset/afd-attn deleted" in deleted.output
    assert api_server.stored("apps", "v1", "statefulsets", "serving") == {}


def test_the_current_context_is_used_and_an_unreachable_server_is_a_clear_error(
    tmp_path: Path, api_server: RunningApiServer, two_pool_config: ClusterConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
    config = write_config(tmp_path / "cluster.yaml", two_pool_config)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    result = RUNNER.invoke(k8s_app, ["status", "--config", str(config)], env=WIDE)
    assert result.exit_code == 1
    assert "error: cannot reach the Kubernetes API server at http://127.0.0.1:1" in result.output

    missing = RUNNER.invoke(k8s_app, ["status", "--config", str(config), "--context", "staging"], env=WIDE)
    assert missing.exit_code == 1
    assert f"error: cannot load Kubernetes credentials from {kubeconfig}" in missing.output
    assert "staging" in missing.output
    assert api_server.requests() == []


def test_no_kubeconfig_anywhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_pool_config: ClusterConfig
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write_config(tmp_path / "cluster.yaml", two_pool_config)
    result = RUNNER.invoke(k8s_app, ["status", "--config", str(config)], env=WIDE)
    assert result.exit_code == 1
    assert "error: no kubeconfig found: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config" in result.output


def test_render_prints_the_manifests_of_the_config_and_overlay() -> None:
    result = RUNNER.invoke(k8s_app, ["render", "--config", str(EXAMPLE_CONFIG), "--overlay", "h100-attn-l40s-ffn"])
    assert result.exit_code == 0, result.output
    from orchestration.k8s.config import load_cluster_config

    expected = render(load_cluster_config(EXAMPLE_CONFIG), "h100-attn-l40s-ffn")
    assert [doc for doc in yaml.safe_load_all(result.output) if doc] == expected
    assert "kubectl -n afd create secret generic afd-cluster-token" in result.output  # how to make the token


def test_bad_input_exits_1_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text("image: x\nmodel: {hostPath: /m}\nattention: {replicas: -1}\nffnPools: [{name: ffn}]\n")
    result = RUNNER.invoke(k8s_app, ["render", "--config", str(bad)], env=WIDE)
    assert result.exit_code == 1
    assert "attention.replicas: Input should be greater than or equal to 0 (got -1)" in result.output

    unknown = RUNNER.invoke(k8s_app, ["render", "--config", str(EXAMPLE_CONFIG), "--overlay", "tpu"], env=WIDE)
    assert unknown.exit_code == 1
    assert f"unknown overlay 'tpu'; overlays: {', '.join(OVERLAYS)}" in unknown.output

    missing = RUNNER.invoke(k8s_app, ["render", "--config", str(tmp_path / "nope.yaml")], env=WIDE)
    assert missing.exit_code == 1 and "cannot read cluster config" in missing.output


def test_schema_describes_every_field_in_camel_case() -> None:
    result = RUNNER.invoke(k8s_app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["required"]) == {"image", "model", "attention", "ffnPools"}
    pool = schema["$defs"]["FfnPool"]["properties"]
    assert pool["replicas"]["description"] == "Node processes (pods) in the pool; 0 parks the pool."


def test_overlays_lists_every_overlay() -> None:
    result = RUNNER.invoke(k8s_app, ["overlays"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == list(OVERLAYS)


def test_the_committed_kustomize_tree_is_what_the_generator_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the generated headers name the config path as given
    result = RUNNER.invoke(k8s_app, ["kustomize", "--config", "examples/cluster.yaml", "--out", str(DEPLOY), "--check"])
    assert result.exit_code == 0, (
        f"deploy/k8s is stale; regenerate from {REPO}: "
        "afd k8s kustomize --config examples/cluster.yaml --out deploy/k8s\n" + result.output
    )


def test_afd_has_the_k8s_commands() -> None:
    from orchestration.cli import app

    result = RUNNER.invoke(app, ["k8s", "--help"], env=WIDE)
    assert result.exit_code == 0
    for command in ("render", "apply", "scale", "status", "delete"):
        assert command in result.output
