"""Every new family through the local cluster `afd up` starts: 2 attention nodes, 3 FFN nodes, one FFN node killed
with SIGKILL mid-stream (issue 12).

Qwen2 dense, GLM-4.5, Step-3.5, gpt-oss, MiniMax and an fp8 block-scaled DeepSeek-V3, each a tiny checkpoint sized to
the demo tokenizer: the survivors re-load the dead node's experts (or dense MLP slices) from the family's own layout
(fused or stacked expert tensors read by rows, fp8 blocks dequantised) while the attention nodes keep the family's
own state (sliding windows shorter than the prompts plus the tokens generated, sinks, lightning-attention states).
Greedy texts are compared with the in-process engine, which test_engine_equivalence (and test_fp8_checkpoints)
prove token-identical to transformers.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from afd.builtin_model import builtin_model_dir
from afd.model_spec import ModelSpec
from benchmarks.load_memory import write_fp8_checkpoint
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.checkpoints import FP8_DEEPSEEK_V3, build_checkpoint, build_with_tokenizer
from tests.engines import greedy_reference_texts
from tests.integration.test_cluster import NEW_TOKENS, PROMPTS, Load, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(request):
    """Starts a LocalCluster; stops it after the test and keeps its node logs when the test failed."""
    clusters = []

    def start(config: LocalClusterConfig) -> LocalCluster:
        cluster = LocalCluster(config)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    report = getattr(request.node, "report_call", None)
    for cluster in clusters:
        cluster.stop(timeout=20)
        if report is not None and report.failed:
            print(f"node logs of the failed test kept in {cluster.workdir}")
        else:
            cluster.remove_workdir()


def _tiny(name: str) -> Callable[[Path, Path], Path]:
    """Builder of the tiny tests/checkpoints.py checkpoint `name`, sized to the demo tokenizer."""
    return lambda directory, demo: build_with_tokenizer(name, directory, demo)


def _fp8_deepseek_v3(directory: Path, demo: Path) -> Path:
    """The fp8 DeepSeek-V3 of tests/checkpoints.py (partial 128x128 blocks everywhere) sized to the demo tokenizer,
    in the published block format. Its config says float32 (the published ones say bfloat16): the cluster's FFN
    shards (3, then 2) and the in-process engine's (2) add their partial sums in other groupings, and only in fp32,
    as for the other test checkpoints, is that rounding far below the greedy margins."""
    vocab_size = json.loads((demo / "config.json").read_text())["vocab_size"]
    source = build_checkpoint(
        "deepseek_v3", directory / "source", overrides=FP8_DEEPSEEK_V3 | {"vocab_size": vocab_size}
    )
    fp8 = write_fp8_checkpoint(source, directory / "fp8", max_shard_bytes=1 << 20)
    config = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}, indent=2))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / file, fp8 / file)
    return fp8


def _shortest_prompt() -> int:
    return min(len(p.split()) for p in PROMPTS)


def _check_sliding(spec: ModelSpec) -> None:
    assert spec.sliding_layers and spec.sliding_window < _shortest_prompt() + NEW_TOKENS


def _check_step3p5(spec: ModelSpec) -> None:
    _check_sliding(spec)
    assert spec.sliding_num_heads != spec.num_heads and spec.head_gate


def _check_qwen2(spec: ModelSpec) -> None:
    _check_sliding(spec)
    assert not spec.is_moe, "dense: the FFN nodes hold slices of every layer's MLP"


def _check_glm4_moe(spec: ModelSpec) -> None:
    moe = spec.moe(1)
    assert spec.layers[0].kind == "dense" and moe is not None and moe.shared_intermediate_size > 0


def _check_minimax(spec: ModelSpec) -> None:
    assert spec.linear_attention is not None and spec.linear_attention.block_size < _shortest_prompt()


def _check_fp8(spec: ModelSpec) -> None:
    assert spec.is_moe and spec.layers[0].kind == "dense"


@dataclass(frozen=True)
class Family:
    build: Callable[[Path, Path], Path]
    """(directory, demo model dir) -> checkpoint directory with the demo tokenizer."""
    check: Callable[[ModelSpec], None]
    """Asserts that the checkpoint has the feature the run is meant to exercise."""
    victim: str
    """The FFN node killed mid-stream."""


FAMILIES: dict[str, Family] = {
    # sliding windows shorter than the prompts plus the tokens generated, sinks; fused expert tensors read by rows
    "gpt_oss": Family(_tiny("gpt_oss"), _check_sliding, "ffn-1"),
    # lightning-attention states beside the softmax layer's paged cache; prompts span several 4-token blocks
    "minimax": Family(_tiny("minimax"), _check_minimax, "ffn-2"),
    # dense: the dead node's MLP slices (not experts) move to the survivors; one sliding layer
    "qwen2": Family(_tiny("qwen2"), _check_qwen2, "ffn-0"),
    # first dense layer, shared expert sliced over the pool, group-limited sigmoid router, partial rotary
    "glm4_moe": Family(_tiny("glm4_moe"), _check_glm4_moe, "ffn-1"),
    # full / sliding layers with their own head counts, head gate; experts as rows of the stacked Hub tensors
    "step3p5": Family(_tiny("step3p5"), _check_step3p5, "ffn-2"),
    # fp8 block-scaled weights: the survivors re-load the dead node's experts dequantising fp8 blocks
    "deepseek_v3_fp8": Family(_fp8_deepseek_v3, _check_fp8, "ffn-1"),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cluster_survives_a_killed_ffn_node(name: str, demo: Path, tmp_path_factory, cluster):
    """2 attention and 3 FFN nodes; one FFN node gets SIGKILL after the first results: no request fails, every text
    equals the in-process engine's, 2 FFN nodes stay ready and the survivors hold every expert."""
    family = FAMILIES[name]
    model = family.build(tmp_path_factory.mktemp(name), demo)
    spec = ModelSpec.from_pretrained(model)
    family.check(spec)
    expected = greedy_reference_texts(model, PROMPTS, NEW_TOKENS)

    c = cluster(LocalClusterConfig(model=model, attn=2, ffn=3, http_port=0, threads_per_node=1, start_timeout_s=120))
    load = Load(c)
    try:
        _wait_for(lambda: len(load.results) >= 3, 90, "first results")
        victim = c.nodes[family.victim]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, 120, "results after the FFN node died")
    finally:
        load.stop()
    assert load.failures == []
    assert load.results and all(text == expected[prompt] for prompt, text in load.results)
    view = {n["node_id"]: n for n in c.cluster()["nodes"]}
    assert sorted(n["role"] for n in view.values() if n["state"] == "ready") == ["attention"] * 2 + ["ffn"] * 2
    assert view[family.victim]["state"] == "dead" and not view[family.victim]["experts"]
    assert sorted(e for n in view.values() for e in n["experts"]) == list(range(spec.num_experts))
