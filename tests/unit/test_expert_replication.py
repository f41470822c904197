"""Hot-expert replication (EPLB under AFD): the replica planner, placements holding an expert on several
nodes, the attention node's split of a replicated expert's tokens, and the controller publishing replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from afd.checkpoint import CheckpointReader
from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.sampling_params import SamplingParams
from afd.transport import InProcessTransport
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.placement_proto import placement_from_proto, placement_to_proto
from attn_nodes.config import EngineConfig
from attn_nodes.dispatch import FfnDispatcher
from attn_nodes.engine import AttentionEngine
from attn_nodes.moe_gate import Routing
from ffn_nodes.shard import FfnShard
from router.controller import Controller, ControllerConfig
from router.expert_placement import imbalance, node_loads, plan_placement, plan_replicas, replicas_beyond
from router.load_metrics import ExpertLoadWindow
from router.membership import Capacity, NodeRecord
from router.metrics import RouterMetrics
from tests.checkpoints import build_skewed_checkpoint

EQUAL = {"a": 1.0, "b": 1.0}


# ---- the planner -----------------------------------------------------------------------------------


def test_the_hottest_expert_is_replicated_onto_the_least_loaded_node():
    base = ExpertPlacement.balanced(4, ["a", "b"])  # a: 0 1, b: 2 3
    load = {0: 100, 1: 10, 2: 10, 3: 10}  # predicted a 110, b 20
    plan = plan_replicas(base, load, EQUAL, max_replicas_per_node=2)
    # expert 0's tokens split over a and b: a 50 + 10, b 50 + 20 -> max/mean 70/65 <= 1.1, so one replica
    assert plan.experts == ((0, 1), (0, 2, 3))
    assert node_loads(plan, load, EQUAL) == {"a": 60.0, "b": 70.0}
    assert replicas_beyond(base, plan) == {"a": (), "b": (0,)}
    assert plan.nodes == base.nodes and plan.mlp_shares == base.mlp_shares


def test_replicas_go_to_the_least_loaded_nodes_first_and_respect_the_per_node_bound():
    base = ExpertPlacement.balanced(8, ["a", "b", "c", "d"])  # two experts each
    load = {0: 100, 1: 100, **{e: 10 for e in range(2, 8)}, 6: 1, 7: 1}  # d is the least loaded (2)
    speeds = dict.fromkeys("abcd", 1.0)
    plan = plan_replicas(base, load, speeds, max_replicas_per_node=1)
    extra = replicas_beyond(base, plan)
    # round 1: expert 0 -> d (load 2); round 2: expert 1 (100 per replica) -> b or c (20): b first in order;
    # round 3: expert 0 or 1 (50 each) -> c; then a would still be hottest but every node has its one replica.
    assert extra == {"a": (), "b": (1,), "c": (0,), "d": (0,)}
    assert max(len(r) for r in extra.values()) <= 1
    assert imbalance(node_loads(plan, load, speeds)) < imbalance(node_loads(base, load, speeds))


def test_no_replica_when_the_load_is_balanced_or_replication_is_bounded_to_zero():
    base = ExpertPlacement.balanced(6, ["a", "b", "c"])
    speeds = dict.fromkeys("abc", 1.0)
    assert plan_replicas(base, dict.fromkeys(range(6), 50), speeds, 2) == base
    assert plan_replicas(base, {}, speeds, 2) == base  # nothing computed yet
    assert plan_replicas(base, {0: 1000}, speeds, 0) == base


def test_a_faster_node_takes_the_replica_by_predicted_time_not_token_count():
    speeds = {"a": 4.0, "b": 1.0, "c": 1.0}
    base = ExpertPlacement.balanced(6, ["a", "b", "c"], list(speeds.values()))  # a: 0-3, b: 4, c: 5
    load = {0: 20, 1: 20, 2: 20, 3: 20, 4: 100, 5: 40}
    # times: a 80 tokens / 4 = 20, b 100, c 40: a is the least loaded although it computes more tokens than c.
    # Expert 4 onto a: a (80 + 50) / 4 = 32.5, b 50. A third replica (on c: 40 + 33.3) would make c the
    # hottest at 73.3 > 50, so the plan stops there.
    plan = plan_replicas(base, load, speeds, 2)
    assert replicas_beyond(base, plan) == {"a": (4,), "b": (), "c": ()}
    assert node_loads(plan, load, speeds) == {"a": 32.5, "b": 50.0, "c": 40.0}


def test_planner_refuses_bad_bounds():
    base = ExpertPlacement.balanced(2, ["a", "b"])
    with pytest.raises(ConfigError):
        plan_replicas(base, {}, EQUAL, -1)
    with pytest.raises(ConfigError):
        plan_replicas(base, {}, EQUAL, 1, target_imbalance=0.9)


def test_a_pool_change_plans_from_the_placement_without_replicas_and_keeps_the_shares():
    base = plan_placement(8, {"a": 1.0, "b": 1.0})
    replicated = plan_replicas(base, {7: 100, 0: 1}, EQUAL, 1)  # 7 (on b) replicated onto a
    assert replicated.experts[0] == (0, 1, 2, 3, 7)
    grown = plan_placement(8, {"a": 1.0, "b": 1.0, "c": 1.0}, previous=base)
    assert sum(len(ids) for ids in grown.experts) == 8  # no replica carried into the new pool's plan


# ---- placements with replicas on the wire and on FFN nodes ------------------------------------------


def test_a_placement_may_hold_an_expert_on_several_nodes_but_every_expert_somewhere():
    placement = ExpertPlacement(4, ("a", "b"), ((0, 1, 3), (2, 3)), (1.0, 1.0), version=5)
    assert placement.has_replicas
    assert placement.holders()[3] == ((0, 2), (1, 1))
    back, _ = placement_from_proto(placement_to_proto(placement, {"a": "h:1"}))
    assert back == placement
    assert ExpertPlacement.from_dict(placement.to_dict()) == placement
    with pytest.raises(ConfigError, match=r"\[2\] are not placed"):
        ExpertPlacement(4, ("a", "b"), ((0, 1, 3), (3,)), (1.0, 1.0))
    with pytest.raises(ConfigError, match="unique"):
        ExpertPlacement(4, ("a", "b"), ((0, 1, 1), (2, 3)), (1.0, 1.0))


# ---- the attention node's split ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_skewed_checkpoint(tmp_path_factory.mktemp("skewed"))


def test_the_split_gives_each_pair_to_exactly_one_replica_in_equal_shares(skewed: Path):
    spec = ModelSpec.from_pretrained(skewed)
    n = spec.num_experts
    placement = ExpertPlacement(
        n, ("a", "b", "c"), ((0, 1, 2), (0, 3, 4, 5), (0, 1, 6, 7)), (1.0, 1.0, 1.0)
    )  # 0 on three nodes, 1 on two
    dispatcher = FfnDispatcher(spec, placement)
    layer = next(i for i, layer in enumerate(spec.layers) if layer.moe is not None)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0], [0, 5], [0, 7]], dtype=torch.int64)
    routing = Routing(ids, torch.full(ids.shape, 0.5))
    hidden = torch.randn(ids.shape[0], spec.hidden_size)
    by_node: dict[str, dict[int, int]] = {}

    def count(dispatch) -> None:
        served = torch.zeros(ids.shape, dtype=torch.int64)  # how many nodes got each (token, expert) pair
        for node, request in dispatch.requests.items():
            rows = dispatch.rows[node]
            rows = torch.arange(ids.shape[0]) if rows is None else rows
            held = placement.experts[placement.index(node)]
            assert request.expert_ids is not None
            for row, local_ids in zip(rows.tolist(), request.expert_ids.tolist(), strict=True):
                for k, local in enumerate(local_ids):
                    if local >= 0:
                        assert held[local] == ids[row, k]  # the local id names the same expert there
                        served[row, k] += 1
                        by_node.setdefault(node, {}).setdefault(held[local], 0)
                        by_node[node][held[local]] += 1
        assert served.eq(1).all()

    first = dispatcher.build(layer, hidden, routing)
    count(first)
    assert sorted(by_node[n].get(0, 0) for n in "abc") == [2, 2, 3]  # expert 0's 7 pairs over three replicas
    assert sorted(by_node[n].get(1, 0) for n in "ac") == [1, 2]  # expert 1's 3 over two
    count(dispatcher.build(layer, hidden, routing))  # the round robin continues where it stopped
    assert sorted(by_node[n].get(0, 0) for n in "abc") == [4, 5, 5]
    assert sorted(by_node[n].get(1, 0) for n in "ac") == [3, 3]
    # one-token batches (decode microbatches) alternate too
    single = Routing(torch.tensor([[0, 2]]), torch.full((1, 2), 0.5))
    fresh = FfnDispatcher(spec, placement)
    computed_by = []
    for _ in range(4):
        requests = fresh.build(layer, hidden[:1], single).requests
        computed_by += [n for n, r in requests.items() if r.expert_ids is not None and r.expert_ids[0, 0] >= 0]
    assert computed_by == ["a", "b", "c", "a"]
    # deterministic: the same sequence of calls splits the same way
    again = FfnDispatcher(spec, placement).build(layer, hidden, routing)
    for node, request in first.requests.items():
        assert torch.equal(request.expert_ids, again.requests[node].expert_ids)


def test_a_node_serving_every_expert_gets_the_gate_choice_as_is(skewed: Path):
    """One FFN node (local id = global id): the request carries the gate's ids and weights themselves, every row;
    with two nodes each gets its own rows and local ids (the general path)."""
    spec = ModelSpec.from_pretrained(skewed)
    n = spec.num_experts
    layer = next(i for i, layer in enumerate(spec.layers) if layer.moe is not None)
    ids = torch.tensor([[0, n - 1], [2, 1], [n - 1, 3]], dtype=torch.int64)
    routing = Routing(ids, torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.625, 0.375]]))
    hidden = torch.randn(ids.shape[0], spec.hidden_size)
    whole = FfnDispatcher(spec, ExpertPlacement(n, ("a",), (tuple(range(n)),), (1.0,))).build(layer, hidden, routing)
    request = whole.requests["a"]
    assert whole.rows["a"] is None and request.hidden is hidden
    assert request.expert_ids is not None and request.expert_ids.dtype == torch.int32
    assert torch.equal(request.expert_ids, ids.to(torch.int32)) and request.expert_weights is routing.weights
    two = ExpertPlacement.balanced(n, ["a", "b"])
    halves = FfnDispatcher(spec, two).build(layer, hidden, routing)
    upper = halves.requests["b"]  # b holds the upper half, as local ids from 0
    assert upper.expert_ids is not None and halves.rows["b"] is not None
    held = [[e - n // 2 if e >= n // 2 else -1 for e in row] for row in ids[halves.rows["b"]].tolist()]
    assert upper.expert_ids.tolist() == held
    # in process (nothing copied to the shards) every node reads the whole microbatch, -1 where it computes nothing
    whole_rows = FfnDispatcher(spec, two, compact_rows=False).build(layer, hidden, routing)
    assert whole_rows.rows == {"a": None, "b": None} and whole_rows.requests["b"].hidden is hidden
    in_place = whole_rows.requests["b"]
    assert in_place.expert_ids is not None and in_place.expert_weights is not None
    assert in_place.expert_ids.tolist() == [[e - n // 2 if e >= n // 2 else -1 for e in row] for row in ids.tolist()]
    assert torch.equal(in_place.expert_weights, routing.weights.masked_fill(in_place.expert_ids < 0, 0.0))


def _engine_run(
    checkpoint: Path, placement: ExpertPlacement, microbatches: int
) -> tuple[list, dict[str, int], dict[int, int]]:
    """Greedy outputs, token-expert pairs per node and per global expert, from the shards' own counters."""
    spec = ModelSpec.from_pretrained(checkpoint)
    reader = CheckpointReader(checkpoint)
    shards = {n: FfnShard.load(checkpoint, placement, n, spec=spec, reader=reader) for n in placement.nodes}
    engine = AttentionEngine.load(
        checkpoint, InProcessTransport(shards), placement, EngineConfig(microbatches=microbatches)
    )
    prompts = [[(7 * i + j) % 150 + 3 for j in range(5 + i)] for i in range(6)]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    per_expert: dict[int, int] = {}
    for node, shard in shards.items():
        for expert, count in zip(placement.experts[placement.index(node)], shard.expert_token_counts(), strict=True):
            per_expert[expert] = per_expert.get(expert, 0) + count
    return outputs, {n: sum(s.expert_token_counts()) for n, s in shards.items()}, per_expert


@pytest.mark.parametrize("microbatches", [1, 2])
def test_planned_replicas_keep_greedy_tokens_and_even_out_the_nodes_counts(skewed: Path, microbatches: int):
    spec = ModelSpec.from_pretrained(skewed)
    base = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"])
    reference, base_counts, per_expert = _engine_run(skewed, base, microbatches)
    # the skewed gate: nearly every token picks expert 0 or 1, both on ffn-0
    assert per_expert[0] + per_expert[1] > 0.45 * sum(per_expert.values())
    assert base_counts["ffn-0"] > 1.5 * base_counts["ffn-1"]
    replicated = plan_replicas(base, per_expert, {"ffn-0": 1.0, "ffn-1": 1.0}, max_replicas_per_node=2)
    assert replicated.has_replicas and set(replicas_beyond(base, replicated)["ffn-1"]) <= {0, 1}
    outputs, counts, _ = _engine_run(skewed, replicated, microbatches)
    assert outputs == reference
    assert sum(counts.values()) == sum(base_counts.values())  # every pair computed once, somewhere
    mean = sum(counts.values()) / len(counts)
    assert max(counts.values()) / mean < max(base_counts.values()) / mean
    assert max(counts.values()) / mean <= 1.15


# ---- the router's window and the controller ---------------------------------------------------------


def test_the_load_window_forgets_samples_older_than_its_span():
    window = ExpertLoadWindow(10.0)
    window.add("a", {0: 5, 1: 1}, now=100.0)
    window.add("b", {0: 2}, now=105.0)
    assert window.per_expert(now=106.0) == {0: 7, 1: 1}
    assert window.per_node(now=106.0) == {"a": 6, "b": 2}
    assert window.per_expert(now=112.0) == {0: 2}
    with pytest.raises(ValueError):
        ExpertLoadWindow(0)


def _controller(spec: ModelSpec, **config) -> tuple[Controller, list[ExpertPlacement], list[ExpertPlacement]]:
    controller = Controller(spec, ClusterAuth(), RouterMetrics("m"), ControllerConfig(**config))
    loaded: list[ExpertPlacement] = []
    switched: list[ExpertPlacement] = []

    async def broadcast_ffn(placement: ExpertPlacement) -> dict[str, BaseException]:
        loaded.append(placement)
        return {}

    async def broadcast_attention(placement: ExpertPlacement) -> None:
        switched.append(placement)

    controller._broadcast_ffn = broadcast_ffn  # type: ignore[method-assign]
    controller._broadcast_attention = broadcast_attention  # type: ignore[method-assign]
    for i in range(2):
        controller.membership.add(NodeRecord(f"ffn-{i}", "ffn", f"127.0.0.1:{i + 1}", Capacity()))
    return controller, loaded, switched


def _beat(controller: Controller, node_id: str, counts: list[int]) -> None:
    assert controller.placement is not None
    load = pb.NodeLoad(expert_token_counts=counts)
    request = pb.HeartbeatRequest(node_id=node_id, load=load, placement_version=controller.placement.version)
    asyncio.run(controller.heartbeat(request))


def test_controller_publishes_replicas_of_hot_experts_as_a_new_version_and_drops_them_on_a_pool_change(
    tiny_checkpoint,
):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))  # 8 experts
    controller, loaded, switched = _controller(spec, expert_replication=True, replication_min_tokens=100)
    asyncio.run(controller.rebalance("start"))
    base = controller.placement
    assert base is not None and base.experts == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert asyncio.run(controller.replicate_hot_experts()) is None  # no load yet
    _beat(controller, "ffn-0", [300, 200, 10, 10])
    _beat(controller, "ffn-1", [10, 10, 10, 10])
    published = asyncio.run(controller.replicate_hot_experts())
    assert published is not None and published.version > base.version
    assert controller.placement == published and loaded[-1] == published and switched[-1] == published
    assert 0 in published.experts[1]  # the hottest expert is on both nodes now
    nodes = {n["node_id"]: n for n in controller.status()["nodes"]}
    assert 0 in nodes["ffn-1"]["replicas"] and nodes["ffn-0"]["replicas"] == []
    # the same load again: the plan is what is published already, no new version
    assert asyncio.run(controller.replicate_hot_experts()) is None
    # a pool change plans from the placement without replicas (minimal movement), so they are gone
    controller.membership.add(NodeRecord("ffn-2", "ffn", "127.0.0.1:9", Capacity()))
    asyncio.run(controller.rebalance("ffn-2 joins"))
    assert controller.placement is not None and not controller.placement.has_replicas


def test_controller_leaves_a_balanced_load_alone(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    controller, loaded, _ = _controller(spec, expert_replication=True, replication_min_tokens=100)
    asyncio.run(controller.rebalance("start"))
    _beat(controller, "ffn-0", [50, 50, 50, 50])
    _beat(controller, "ffn-1", [50, 50, 50, 50])
    count = len(loaded)
    assert asyncio.run(controller.replicate_hot_experts()) is None
    assert len(loaded) == count


def test_replication_config_is_validated():
    with pytest.raises(ConfigError):
        ControllerConfig(max_replicas_per_node=-1)
    with pytest.raises(ConfigError):
        ControllerConfig(replication_target_imbalance=0.5)
    with pytest.raises(ConfigError):
        ControllerConfig(replication_window_s=0)


def test_status_table_shows_replicas_after_the_nodes_own_experts():
    import io

    from rich.console import Console

    from orchestration.status_view import cluster_table

    ffn = {"role": "ffn", "state": "ready", "busy_fraction": 0.5, "tokens_per_s": 1.0}
    view = {
        "model": "m",
        "placement_version": 7,
        "nodes": [
            {**ffn, "node_id": "ffn-0", "experts": [0, 1, 2, 3], "replicas": []},
            {**ffn, "node_id": "ffn-1", "experts": [0, 1, 4, 5, 6, 7], "replicas": [0, 1]},
        ],
    }
    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
    console.print(cluster_table(view))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "4 (0-3)" in out and "6 (4-7 +0,1)" in out


def test_expert_replication_is_off_by_default_and_the_flag_takes_on_or_off():
    from typer.testing import CliRunner

    from orchestration.cli import app
    from orchestration.local_cluster import LocalClusterConfig

    assert LocalClusterConfig().expert_replication is False  # off until measured
    assert ControllerConfig().expert_replication is False
    for command in (["up"], ["node", "router", "--insecure"]):
        result = CliRunner().invoke(app, [*command, "--expert-replication", "maybe"])
        assert result.exit_code == 2 and "on or off" in result.output, result.output


def test_ffn_load_reports_the_previous_shards_pairs_under_the_current_layout(tiny_checkpoint):
    """A switch to a replica placement must not lose the pairs the old shard computed (frames in flight
    under the old version, and those since the last report): they are reported by global expert."""
    from afd.ffn_messages import FfnRequest
    from ffn_nodes.batching import Batcher

    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    n = spec.num_experts
    old = ExpertPlacement(n, ("ffn-0", "ffn-1"), ((0, 1, 2, 3), (4, 5, 6, 7)), (1.0, 1.0), version=1)
    new = ExpertPlacement(n, ("ffn-0", "ffn-1"), ((0, 1, 2, 3), (0, 1, 4, 5, 6, 7)), (1.0, 1.0), version=2)
    held: dict[int, FfnShard] = {1: FfnShard.load(directory, old, "ffn-1")}
    batcher = Batcher("ffn-1", 1024, lambda: dict(held), lambda error, where: None)
    batcher.count_experts_from(held[1])
    layer = next(i for i, layer in enumerate(spec.layers) if layer.moe is not None)

    def compute(shard: FfnShard, local_ids: list[list[int]]) -> None:
        ids = torch.tensor(local_ids, dtype=torch.int32)
        shard.compute(FfnRequest(layer, torch.randn(len(local_ids), spec.hidden_size), ids, torch.ones(ids.shape)))

    compute(held[1], [[0, 1], [0, -1]])  # experts 4, 5, 4 under v1
    assert list(batcher.take_load(held[1], reset=True).expert_token_counts) == [2, 1, 0, 0]
    compute(held[1], [[3, -1]])  # expert 7, not reported yet when the switch comes
    held[2] = FfnShard.load(directory, new, "ffn-1")  # the node installs v2 (as FfnNodeServer._install)
    batcher.count_experts_from(held[2])
    compute(held[1], [[1, 2]])  # a frame still addressed under v1: experts 5, 6
    compute(held[2], [[0, 2], [1, -1]])  # v2 local ids: 0 -> expert 0, 2 -> expert 4, 1 -> expert 1
    # v2's local ids: 0 1 4 5 6 7 -> pairs: expert 0: 1, 1: 1, 4: 1, 5: 1, 6: 1, 7: 1
    assert list(batcher.take_load(held[2], reset=True).expert_token_counts) == [1, 1, 1, 1, 1, 1]
    assert list(batcher.take_load(held[2], reset=True).expert_token_counts) == [0] * 6  # reported once
    # Two switches between reports: v1's pairs since the last report outlive its shard (retired when v3 comes).
    compute(held[1], [[2, -1]])  # expert 6 under v1
    compute(held[2], [[5, -1]])  # expert 7 under v2
    third = ExpertPlacement(n, ("ffn-0", "ffn-1"), ((0, 1, 2, 3), (4, 5, 6, 7)), (1.0, 1.0), version=3)
    batcher.retire(held.pop(1))  # as FfnNodeServer._install drops the previous shard
    held[3] = FfnShard.load(directory, third, "ffn-1")
    batcher.count_experts_from(held[3])
    compute(held[3], [[0, -1]])  # expert 4 under v3
    assert list(batcher.take_load(held[3], reset=True).expert_token_counts) == [1, 0, 1, 1]  # experts 4 5 6 7
    assert list(batcher.take_load(held[3], reset=True).expert_token_counts) == [0] * 4
