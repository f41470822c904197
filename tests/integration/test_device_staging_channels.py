"""gloo and shm channels between two in-process ends: frames of "device" tensors (tests.unit.test_device_staging's
OnAccelerator, a CPU tensor that says cuda:0) arrive bit-exact and are read only through non-blocking copies
into (simulated) pinned staging memory, one wait per frame; CPU frames take no staging at all."""

from __future__ import annotations

import pytest
import torch

from tests.integration.channel_peer import header_for, specs
from tests.integration.test_channels import BACKENDS, listener_for, pair, sample_tensors  # noqa: F401 - fixtures
from tests.unit.test_device_staging import pinned, send_and_check  # noqa: F401 - the `pinned` fixture


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "device"])
def test_device_frames_travel_bit_exact_through_host_staging(pair, pinned, backend, size, on_device):  # noqa: F811
    attention, ffn = pair(backend)
    cpu = sample_tensors()
    if size == "large":  # gloo: not inline (own messages, staged per frame); shm: streams through the ring
        cpu.append(torch.randn(400_000).to(torch.bfloat16))
    send_and_check(attention, ffn, cpu, header_for(cpu), pinned, on_device, specs)
