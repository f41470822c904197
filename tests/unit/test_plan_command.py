"""`afd plan` (table, --json, --pareto, -o), plan.json validation, and the plan brought to `afd up` and
`afd k8s render`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from afd.errors import AfdError
from afd.planning.plan_file import Deployment, PlanFile, Pool, read_plan
from orchestration import up_command
from orchestration.cli import app
from tests.unit.test_planning import QWEN3_30B_A3B

runner = CliRunner()
EXAMPLE_CLUSTER = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"


@pytest.fixture
def config_json(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_30B_A3B))
    return path


def _plan(config_json: Path, *args: str) -> Any:
    return runner.invoke(app, ["plan", "--model", str(config_json), *args])


def test_plan_prints_a_ranked_table(config_json):
    result = _plan(config_json, "--hardware", "h20:4,l40s:4", "--slo-tpot-ms", "50", "--top", "3")
    assert result.exit_code == 0, result.output
    assert "afd plan: Qwen3MoeForCausalLM on 4 x h20, 4 x l40s" in result.output
    assert "tok/s/acc" in result.output and "regime:" in result.output and "MegaScale-Infer" in result.output


def test_plan_json_schema(config_json, tmp_path):
    out = tmp_path / "plan.json"
    result = _plan(
        config_json, "--hardware", "h20:4,l40s:4", "--slo-tpot-ms", "50", "--json", "--top", "4",
        "--price", "h20=1.2,l40s=0.9", "--context", "2048", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document == json.loads(out.read_text())  # --json prints what -o writes
    parsed = PlanFile.model_validate(document)  # the schema afd up / k8s render read
    assert parsed.version == 1 and parsed.architecture == "Qwen3MoeForCausalLM"
    assert document["request"] == {
        "inventory": {"h20": 4, "l40s": 4},
        "slo_tpot_ms": 50.0,
        "context_len": 2048,
        "link": "400gbe",
        "prices_usd_per_hour": {"h20": 1.2, "l40s": 0.9},
        "objective": "per-dollar",
    }
    assert len(document["candidates"]) == 4
    expected = {
        "attention", "ffn", "microbatches", "batch_per_attention_node", "context_len", "link", "decode_tok_s",
        "tok_s_per_accelerator", "tokens_per_usd", "usd_per_mtok", "cost_usd_per_hour", "tpot_ms",
        "kv_capacity_tokens", "max_batch_by_kv", "exposed", "attention_us", "ffn_us", "link_us",
        "megascale_microbatches", "ffn_hidden", "fits", "problems", "basis", "replicas", "inventory_tok_s",
    }  # fmt: skip
    for candidate in document["candidates"]:
        assert set(candidate) == expected
        assert candidate["tpot_ms"] <= 50 and candidate["fits"]
        assert candidate["exposed"] in ("attention-bound", "ffn-bound", "link-bound")
    ranked = [c["tokens_per_usd"] for c in document["candidates"]]
    assert ranked == sorted(ranked, reverse=True)
    assert document["prediction"] == document["candidates"][0]
    best = document["candidates"][0]
    assert document["deployment"]["attention"]["count"] == best["attention"]["count"]
    assert document["deployment"]["microbatches"] == best["microbatches"]
    assert set(document["rules"]) == {
        "chosen_regime", "why", "best_following_megascale_infer", "best_following_fastafd",
    }  # fmt: skip


def test_plan_pareto_writes_a_png(config_json, tmp_path):
    png = tmp_path / "plots" / "pareto.png"
    result = _plan(config_json, "--hardware", "h20:2,l40s:2", "--slo-tpot-ms", "50", "--pareto", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_refuses_an_impossible_inventory_with_a_clear_message(config_json):
    result = _plan(config_json, "--hardware", "l40s:1,l20:1", "--slo-tpot-ms", "50")
    assert result.exit_code == 2
    assert "not enough memory for the experts" in result.output
    result = _plan(config_json, "--hardware", "b200:8", "--slo-tpot-ms", "50")
    assert result.exit_code == 2 and "unknown hardware kind 'b200'" in result.output
    result = _plan(config_json, "--hardware", "h20:4", "--slo-tpot-ms", "50", "--link", "800gbe")
    assert result.exit_code == 2 and "unknown link '800gbe'" in result.output


def test_plan_reads_a_cluster_view_and_transport_bench_as_calibration(config_json, tmp_path):
    view = {
        "nodes": [
            {"role": "attention", "state": "ready", "device_kind": "NVIDIA H20", "measured_us": {"per_token": 9.0}},
            {"role": "ffn", "state": "ready", "device_kind": "NVIDIA L40S", "measured_us": {"per_token_expert": 4.0}},
        ]
    }
    (tmp_path / "view.json").write_text(json.dumps(view))
    rows = [
        {"kind": "bandwidth", "transport": "nccl", "size_bytes": 1 << 20, "algbw_gbps": 20.0},
        {"kind": "bandwidth", "transport": "nccl", "size_bytes": 1 << 26, "algbw_gbps": 40.0},
        {"kind": "latency", "transport": "nccl", "size_bytes": 65536, "nccl_p50_us": 12.0},
    ]
    (tmp_path / "link.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _plan(
        config_json, "--hardware", "h20:4,l40s:4", "--slo-tpot-ms", "200", "--json", "--link", "measured",
        "--calibration", str(tmp_path / "view.json"), "--calibration", str(tmp_path / "link.jsonl"), "--top", "10000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    attention = {(c["attention"]["kind"], c["basis"]["attention"]) for c in document["candidates"]}
    ffn = {(c["ffn"]["kind"], c["basis"]["ffn"]) for c in document["candidates"]}
    scaled = "scaled from {} (measured) by bandwidth and FLOP ratios"
    assert attention == {("h20", "measured on h20"), ("l40s", scaled.format("h20"))}
    assert ffn == {("l40s", "measured on l40s"), ("h20", scaled.format("l40s"))}
    assert "afd bench transport (nccl, 67108864 B frames)" in document["candidates"][0]["basis"]["link"]


# ---- plan.json -> afd up / afd k8s render ------------------------------------------------------------------
def _document(attention: Pool, ffn: Pool, microbatches: int = 3) -> PlanFile:
    return PlanFile(
        model="/models/m",
        architecture="Qwen3MoeForCausalLM",
        request={},
        deployment=Deployment(attention=attention, ffn=ffn, microbatches=microbatches, batch_per_attention_node=64),
        prediction={},
        rules={},
        candidates=[],
    )


class _Stop(AfdError):
    pass


def test_plan_round_trips_to_afd_up_flags(config_json, tmp_path, monkeypatch):
    out = tmp_path / "plan.json"
    result = _plan(config_json, "--hardware", "cpu:5", "--slo-tpot-ms", "1000", "--link", "loopback", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    seen: dict[str, Any] = {}

    class FakeCluster:  # records what `afd up` would start, then stops before any process
        workdir = tmp_path

        def __init__(self, config: Any) -> None:
            seen["config"] = config

        def start(self) -> None:
            raise _Stop("stopped by the test before starting processes")

        def stop(self) -> None:
            seen["stopped"] = True

    class FakeControl:
        url, secret = "http://127.0.0.1:1", "s"

        def __init__(self, *args: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(up_command, "LocalCluster", FakeCluster)
    monkeypatch.setattr(up_command, "ControlServer", FakeControl)
    monkeypatch.setattr(up_command.signal, "signal", lambda *args: None)
    result = runner.invoke(app, ["up", "--plan", str(out), "--name", "plan-round-trip-test"])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    config = seen["config"]
    assert (config.attn, config.ffn, config.microbatches) == (
        plan.deployment.attention.count,
        plan.deployment.ffn.count,
        str(plan.deployment.microbatches),
    )
    assert plan.up_arguments() == [
        "--attn", str(config.attn), "--ffn", str(config.ffn), "--microbatches", config.microbatches,
    ]  # fmt: skip
    assert "note:" not in result.output  # a CPU plan runs as planned
    assert seen["stopped"]


def test_an_accelerator_plan_on_afd_up_says_it_runs_on_cpu(tmp_path):
    from rich.console import Console

    from orchestration.plan_command import up_settings_from_plan

    path = tmp_path / "plan.json"
    _document(Pool(kind="h20", count=2), Pool(kind="l40s", count=6), microbatches=2).write(path)
    console = Console(record=True, width=200)
    assert up_settings_from_plan(path, console) == (2, 6, "2")
    assert "runs every node on this machine's CPU" in console.export_text()


def _manifests(output: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _statefulset(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(m for m in manifests if m["kind"] == "StatefulSet" and m["metadata"]["name"] == name)


def test_k8s_render_plan_gives_the_plans_pools(tmp_path):
    path = tmp_path / "plan.json"
    h20 = Pool(kind="h20", count=3, k8s_resource="nvidia.com/gpu", k8s_product="NVIDIA-H20")
    l40s = Pool(kind="l40s", count=5, k8s_resource="nvidia.com/gpu", k8s_product="NVIDIA-L40S")
    _document(h20, l40s, microbatches=3).write(path)
    result = runner.invoke(app, ["k8s", "render", "--config", str(EXAMPLE_CLUSTER), "--plan", str(path)])
    assert result.exit_code == 0, result.output
    manifests = _manifests(result.stdout)
    attention = _statefulset(manifests, "afd-attn")
    ffn = _statefulset(manifests, "afd-ffn-l40s")
    assert attention["spec"]["replicas"] == 3 and ffn["spec"]["replicas"] == 5
    assert attention["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H20"
    assert ffn["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L40S"
    args = attention["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--microbatches") + 1] == "3"
    assert not [m for m in manifests if m["kind"] == "StatefulSet" and m["metadata"]["name"] == "afd-ffn"]


def test_k8s_render_cpu_plan_drops_accelerators_and_nccl(tmp_path):
    path = tmp_path / "plan.json"
    _document(Pool(kind="cpu", count=2), Pool(kind="cpu", count=4), microbatches=1).write(path)
    result = runner.invoke(app, ["k8s", "render", "--config", str(EXAMPLE_CLUSTER), "--plan", str(path)])
    assert result.exit_code == 0, result.output
    manifests = _manifests(result.stdout)
    attention = _statefulset(manifests, "afd-attn")
    container = attention["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["args"][container["args"].index("--transport") + 1] == "grpc"  # nccl needs GPUs
    assert _statefulset(manifests, "afd-ffn-cpu")["spec"]["replicas"] == 4


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(version=2), "has version 2; this release reads version 1"),
        (lambda d: d["deployment"]["attention"].update(count=0), "deployment.attention.count"),
        (lambda d: d["deployment"].pop("microbatches"), "deployment.microbatches: Field required"),
        (lambda d: d.update(extra=1), "extra: unknown field"),
    ],
)
def test_plan_file_is_validated_on_read(tmp_path, edit, expected):
    path = tmp_path / "plan.json"
    _document(Pool(kind="cpu", count=1), Pool(kind="cpu", count=1)).write(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AfdError) as error:
        read_plan(path)
    assert expected in str(error.value)
    result = runner.invoke(app, ["up", "--plan", str(path), "--name", "plan-validation-test"])
    assert result.exit_code == 2 and expected.split(":")[0] in result.output
