"""MiniMax-M1 / Text-01: the spec read from its configs, the lightning layers' recurrent state in the cache
manager's accounting (finish, abort, preemption), and decoding that equals transformers' generate on long
sequences, chunked prefills and microbatches.

Greedy equivalence over 1, 2 and 3 FFN shards, first-step logits and role-pruned loading run for MiniMax in
test_engine_equivalence.py and test_checkpoint_roles.py, over every architecture of tests/checkpoints.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd.errors import ConfigError, PeerError
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.kv_cache import blocks_for_budget
from attn_nodes.linear_attention import LinearStateStore
from tests.checkpoints import reference_greedy, reference_model
from tests.engines import inprocess_engine

PROMPTS = [[7], [3, 14, 15, 92, 65], list(range(11, 30)), [5, 6, 7, 8, 9] * 5]


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def minimax(tiny_checkpoint):
    """(checkpoint, reference model, {(prompt index, new tokens): reference tokens})."""
    directory = tiny_checkpoint("minimax")
    model = reference_model(directory)
    cache: dict[tuple[int, int], list[int]] = {}

    def expected(index: int, tokens: int) -> list[int]:
        if (index, tokens) not in cache:
            cache[index, tokens] = reference_greedy(model, PROMPTS[index], tokens)
        return cache[index, tokens]

    return directory, model, expected


def test_spec_of_the_tiny_checkpoint(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("minimax"))
    assert spec.family == "minimax" and spec.linear_attention is not None
    assert spec.linear_attention.layers == (0, 2, 3) and spec.linear_attention.block_size == 4
    assert [spec.is_linear_attention(i) for i in range(4)] == [True, False, True, True]
    scales = spec.residual_scales
    assert scales is not None
    assert (scales.full_attn_alpha, scales.full_attn_beta, scales.linear_attn_alpha, scales.linear_attn_beta) == (
        1.5,
        0.75,
        1.25,
        1.5,
    )
    assert scales.mlp_alpha == 1.25
    moe = spec.moe(0)
    assert moe is not None and moe.routed_scaling_factor == 0.75 and moe.norm_topk_prob  # mlp_beta_factor
    assert spec.rope.rotary_dim == spec.head_dim == 16 and not spec.qkv_bias


def _hub_config(**overrides):
    config = {
        "architectures": ["MiniMaxForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    return config | overrides


def test_layer_kinds_from_attn_type_list_or_the_default_alternation():
    """The original MiniMax configs list attn_type_list (0 linear, 1 softmax); without either list the config
    class alternates softmax, linear, ... from layer 0."""
    spec = ModelSpec.from_config(_hub_config(attn_type_list=[0, 0, 1, 0], partial_rotary_factor=0.5))
    assert spec.linear_attention is not None and spec.linear_attention.layers == (0, 1, 3)
    assert spec.linear_attention.block_size == 256 and spec.rope.rotary_dim == 8  # whole heads rotate
    default = ModelSpec.from_config(_hub_config())
    assert default.linear_attention is not None and default.linear_attention.layers == (1, 3)
    assert ModelSpec.from_config(_hub_config(layer_types=["full_attention"] * 4)).linear_attention is None


def test_bad_minimax_configs_are_refused_clearly():
    with pytest.raises(ConfigError, match=r"\['sliding_attention'\].*not supported for MiniMax.*linear_attention"):
        ModelSpec.from_config(_hub_config(layer_types=["linear_attention", "sliding_attention"] * 2))
    with pytest.raises(ConfigError, match="must list 4 layers"):
        ModelSpec.from_config(_hub_config(layer_types=["linear_attention"]))
    with pytest.raises(ConfigError, match="attn_type_list must hold 0"):
        ModelSpec.from_config(_hub_config(attn_type_list=[0, 2, 1, 0]))
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelSpec.from_config(_hub_config(sliding_window=8))
    with pytest.raises(ConfigError, match="block_size must be >= 1"):
        ModelSpec.from_config(_hub_config(block_size=0))


def test_linear_layers_hold_states_not_kv_blocks(tiny_checkpoint):
    """Only the softmax layer gets a paged cache; the lightning layers' entries are the state store's tensors,
    whose memory (max_num_seqs slots) comes out of kv_cache_gib first."""
    directory = tiny_checkpoint("minimax")
    config = EngineConfig(block_size=4, kv_cache_gib=0.01, max_num_seqs=8)
    engine = inprocess_engine(directory, 1, config)
    spec, states = engine.spec, engine.kv.states
    assert states is not None and states.num_slots == 8 and engine.kv.num_free_state_slots == 8
    per_slot = LinearStateStore.bytes_per_slot(spec, torch.float32)
    assert per_slot == 3 * 4 * 16 * 16 * 4
    expected = blocks_for_budget(0.01 - 8 * per_slot / 2**30, 1, 4, spec.kv_entry_width, torch.float32)
    assert engine.kv.num_blocks == expected
    for layer, tensor in enumerate(engine.runner.cache):
        if spec.is_linear_attention(layer):
            assert tensor is states.layer(layer) and tensor.shape == (8, 4, 16, 16)
        else:
            assert tensor.shape == (expected * 4, spec.kv_entry_width)
    with pytest.raises(ConfigError, match=r"max_num_seqs=64 requests need .* GiB"):
        inprocess_engine(directory, 1, EngineConfig(kv_cache_gib=0.0005, max_num_seqs=64))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_long_sequence_decodes_as_the_reference(num_shards, minimax):
    """A 25-token prompt (7 prefill blocks, the last partial) and 80 decoded tokens through the recurrence."""
    directory, _, expected = minimax
    engine = inprocess_engine(directory, num_shards, EngineConfig(block_size=4, num_kv_blocks=64))
    assert engine.generate([PROMPTS[3]], _greedy(80)) == [expected(3, 80)]
    assert engine.kv.num_free_state_slots == engine.kv.states.num_slots  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("budget", "microbatches"),
    [(6, 1), (8, 1), (5, 2), (2048, 2)],
    ids=["chunks-mid-block", "chunks-on-blocks", "chunks-and-microbatches", "microbatches"],
)
def test_chunked_prefill_and_microbatches_continue_the_state(budget, microbatches, minimax):
    """Prefill chunks that start inside a lightning block (6, 5 tokens) or on its boundary (8) carry the state
    from chunk to chunk; microbatches each update their own requests' states."""
    directory, _, expected = minimax
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=budget, microbatches=microbatches)
    engine = inprocess_engine(directory, 2, config)
    assert engine.generate(PROMPTS, _greedy(12)) == [expected(i, 12) for i in range(len(PROMPTS))]


def _slot_holders(engine) -> set[str]:
    return {r.request_id for r in engine.requests.values() if engine.kv.state_slot(r.request_id) >= 0}


def test_states_are_freed_on_finish_and_preemption(minimax):
    """A KV cache too small for all four requests: the scheduler preempts, each preempted request gives its state
    slot back with its blocks and re-prefills from a fresh state; tokens still equal the reference."""
    directory, _, expected = minimax
    engine = inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=12, max_num_seqs=4))
    states = engine.kv.states
    assert states is not None
    ids = [engine.add_request(p, _greedy(12)) for p in PROMPTS]
    results: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
        running = {r.request_id for r in engine.scheduler.running}
        assert _slot_holders(engine) == running, "exactly the running requests hold a state slot"
        assert states.num_used == len(running) and states.num_free == states.num_slots - len(running)
    assert engine.scheduler.num_preemptions_total > 0, "the test must preempt"
    assert [results[i] for i in ids] == [expected(i, 12) for i in range(len(PROMPTS))]
    assert states.num_free == states.num_slots and engine.kv.num_free_blocks == engine.kv.num_blocks


def test_state_is_freed_on_abort(minimax):
    directory, _, _ = minimax
    engine = inprocess_engine(directory, 1, EngineConfig(block_size=4, num_kv_blocks=32, max_num_seqs=2))
    first = engine.add_request(PROMPTS[2], _greedy(50))
    second = engine.add_request(PROMPTS[1], _greedy(50))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_state_slots == 0 and engine.kv.state_slot(first) != engine.kv.state_slot(second)
    engine.abort(first)
    assert engine.kv.num_free_state_slots == 1 and engine.kv.state_slot(first) == -1
    third = engine.add_request(PROMPTS[0], _greedy(3))  # takes the freed slot, from a fresh state
    outputs: dict[str, list[int]] = {second: [], third: []}
    while third in engine.requests:
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    engine.abort(second)
    assert engine.kv.num_free_state_slots == 2 and engine.kv.num_free_blocks == engine.kv.num_blocks
    assert outputs[third] == minimax[2](0, 3)


def test_checkpoint_without_stored_decays(minimax, tmp_path):
    """Checkpoints that do not store the decay buffers: the tables computed from the config decode the same."""
    directory, _, expected = minimax
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        tensors = {n: f.get_tensor(n) for n in keys if not n.endswith(("_decay", "slope_rate"))}
    assert len(tensors) < len(keys)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(json.loads((directory / "config.json").read_text())))
    engine = inprocess_engine(tmp_path, 2, EngineConfig(block_size=4, num_kv_blocks=64))
    assert engine.generate(PROMPTS, _greedy(12)) == [expected(i, 12) for i in range(len(PROMPTS))]


def test_bench_engine_accepts_minimax(tiny_checkpoint, monkeypatch):
    """`afd bench engine --checkpoint DIR` runs end to end (bandwidth probes stubbed: they read a GiB); the roofline
    counts a state per request on the lightning layers, not a KV cache growing with the context."""
    from benchmarks import engine

    monkeypatch.setattr(engine, "read_bandwidth_gbs", lambda **_: 10.0)
    monkeypatch.setattr(engine, "copy_bandwidth_gbs", lambda **_: 10.0)
    directory = tiny_checkpoint("minimax")
    results, context = engine.run([1, 2], 8, 2, 3, directory, repeats=1)
    assert [r.batch for r in results] == [1, 2] and context["ffn_shards"] == 3
    assert all(r.bytes_per_decode_step > 0 and r.engine_tok_s > 0 for r in results)
    spec = ModelSpec.from_pretrained(directory)
    growth = engine._bytes_per_decode_step(spec, 1, 1001, 2.0, 2) - engine._bytes_per_decode_step(spec, 1, 1, 2.0, 2)
    assert growth == 1000 * spec.kv_entry_width * 1 * 2, "only the one softmax layer's cache grows with context"


def test_start_up_calibration_runs_the_lightning_layers(tiny_checkpoint):
    """The attention node measures its per-token cost at start-up over every layer, lightning ones included."""
    from attn_nodes.calibration import attention_us_per_token
    from attn_nodes.model import AttentionHalfModel

    assert attention_us_per_token(AttentionHalfModel.load(tiny_checkpoint("minimax"), 256), repeats=1) > 0


class _FailingTransport:
    """Forwards to the engine's transport, but the combines numbered in `fail_at` raise PeerError (once each), as
    when an FFN node dies mid-step."""

    def __init__(self, inner, fail_at: set[int]) -> None:
        self.inner, self.fail_at, self.calls = inner, set(fail_at), 0

    def dispatch(self, requests):
        return self.inner.dispatch(requests)

    def combine(self, pending):
        self.calls += 1
        partials = self.inner.combine(pending)
        if self.calls in self.fail_at:
            self.fail_at.discard(self.calls)
            raise PeerError("ffn-1", "connection lost")
        return partials

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_step_that_fails_midway_runs_again_from_the_same_states(minimax):
    """The engine thread re-runs a step an FFN node failed (KV writes are idempotent); lightning layers update
    their states in place, so the failed step's updates must be undone: tokens still equal the reference.
    Failures hit decode steps and prefill chunks (6-token budget) after lightning layers have run."""
    directory, _, expected = minimax
    engine = inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=6))
    flaky = _FailingTransport(engine.runner.transport, {3, 7, 15, 23, 40, 58})
    engine.runner.transport = flaky  # type: ignore[assignment]
    ids = [engine.add_request(p, _greedy(12)) for p in PROMPTS]
    results: dict[str, list[int]] = {i: [] for i in ids}
    failures = 0
    for _ in range(500):
        if not engine.has_unfinished():
            break
        try:
            outputs = engine.step()
        except PeerError:
            failures += 1
            continue
        for out in outputs:
            results[out.request_id].extend(out.new_token_ids)
    assert failures == 6 and not flaky.fail_at
    assert [results[i] for i in ids] == [expected(i, 12) for i in range(len(PROMPTS))]
