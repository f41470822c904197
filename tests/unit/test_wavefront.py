"""The microbatch wavefront of ModelRunner.forward: its dispatch/combine order, and tokens that do not depend on m."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from afd.ffn_messages import FfnRequest
from afd.sampling_params import SamplingParams
from afd.transport.base import FfnTransport, PendingCombine
from attn_nodes.config import EngineConfig
from tests.checkpoints import ARCHITECTURES
from tests.engines import inprocess_engine

PROMPTS = [[7], [3, 14, 15, 92, 65], [11, 12, 13, 14, 15, 16, 17], [5, 6]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

Event = tuple[str, int, int]
"""("dispatch" | "combine", layer, microbatch)."""


class _Recorded(PendingCombine):
    def __init__(self, inner: PendingCombine, layer: int, microbatch: int) -> None:
        super().__init__(inner.nodes)
        self.inner, self.layer, self.microbatch = inner, layer, microbatch


class RecordingTransport(FfnTransport):
    """Wraps a transport and records every dispatch and combine with its (layer, microbatch)."""

    def __init__(self, inner: FfnTransport) -> None:
        self.inner = inner
        self.events: list[Event] = []

    def set_peers(self, peers: Mapping[str, str]) -> None:
        self.inner.set_peers(peers)

    def dispatch(self, requests: Mapping[str, FfnRequest]) -> PendingCombine:
        keys = {(r.layer, r.microbatch) for r in requests.values()}
        assert len(keys) == 1, f"one dispatch carries one layer of one microbatch, got {keys}"
        ((layer, microbatch),) = keys
        self.events.append(("dispatch", layer, microbatch))
        return _Recorded(self.inner.dispatch(requests), layer, microbatch)

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        assert isinstance(pending, _Recorded)
        self.events.append(("combine", pending.layer, pending.microbatch))
        return self.inner.combine(pending.inner)


def wavefront(num_layers: int, m: int) -> list[Event]:
    """The order the runner's docstring states: D(0, *), then C(L, i) D(L+1, i) round-robin over i."""
    order: list[Event] = [("dispatch", 0, i) for i in range(m)]
    for layer in range(num_layers):
        for i in range(m):
            order.append(("combine", layer, i))
            if layer + 1 < num_layers:
                order.append(("dispatch", layer + 1, i))
    return order


@pytest.mark.parametrize("m", [1, 2, 3])
def test_each_step_runs_the_wavefront(tiny_checkpoint, m):
    engine = inprocess_engine(tiny_checkpoint("deepseek_v3"), 2, EngineConfig(block_size=4, microbatches=m))
    recorder = RecordingTransport(engine.runner.transport)
    engine.runner.transport = recorder
    layers = engine.spec.num_layers
    assert layers >= 2, "the order only shows with several layers"
    expected_step = wavefront(layers, m)
    steps = 0
    for prompt in PROMPTS:
        engine.add_request(prompt, GREEDY)
    while engine.has_unfinished():
        recorder.events.clear()
        engine.step()
        running = {mb for _, _, mb in recorder.events}
        step_m = len(running)  # the last steps may have fewer requests than microbatches
        assert recorder.events == wavefront(layers, step_m), f"step {steps}: {recorder.events}"
        steps += 1
    assert steps > 1
    assert len(expected_step) == 2 * layers * m
    waits = engine.runner.transfers.wait_totals
    assert len(waits) == layers and all(w >= 0.0 for w in waits)
    assert engine.runner.transfers.round_trip_totals[0] > 0


def test_wavefront_order_is_not_layer_by_layer():
    """The old order (all microbatches of a layer dispatched, then all combined) differs from the wavefront."""
    layer_by_layer = []
    for layer in range(2):
        layer_by_layer += [("dispatch", layer, i) for i in range(2)] + [("combine", layer, i) for i in range(2)]
    assert wavefront(2, 2) != layer_by_layer
    assert wavefront(2, 1) == [("dispatch", 0, 0), ("combine", 0, 0), ("dispatch", 1, 0), ("combine", 1, 0)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokens_do_not_depend_on_microbatches(tiny_checkpoint, arch):
    directory = tiny_checkpoint(arch)
    outputs = {
        m: inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=64, microbatches=m)).generate(
            PROMPTS, GREEDY
        )
        for m in (1, 2, 3)
    }
    assert outputs[2] == outputs[1]
    assert outputs[3] == outputs[1]
