"""The compute device of a node: parsing `--device`, refusing one that is not present, describing it.

Every role computes on exactly one torch device, named as torch names them: `cpu`, `cuda`, `cuda:N` (ROCm
builds of torch call their GPUs `cuda` too), and whatever other device type this torch build accepts (`xpu`,
`npu`, `mps`, ...), which is passed through. `meta` is accepted for tests and dry runs: it builds every tensor
without storage, so a decode step on it proves that no code reads a device tensor back to the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from afd.errors import ConfigError


def parse_device(name: str) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", "xpu:0", ...) as a torch.device that is present on this machine.

    Raises ConfigError naming what was found when the device type is unknown to this torch build or the
    device (or index) is not present. A bare accelerator type means its index 0 (as vLLM's `--device cuda`)."""
    text = name.strip()
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a torch device ({exc}); found: {describe_present()}") from exc
    if device.type in ("cpu", "meta"):
        return torch.device(device.type)
    module = getattr(torch, device.type, None)
    count = _device_count(device.type)
    if module is None or count == 0:
        raise ConfigError(f"--device {name!r}: no {device.type} device is present; found: {describe_present()}")
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ConfigError(
            f"--device {name!r}: {device.type} has {count} device(s), indices 0..{count - 1}; "
            f"found: {describe_present()}"
        )
    return torch.device(device.type, index)


def parse_device_list(text: str) -> list[torch.device]:
    """A pool's devices, `cpu`, `cuda` or a comma list such as `cuda:0,cuda:1` (nodes take them in turn)."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise ConfigError("a device list needs at least one device, e.g. cpu, cuda or cuda:0,cuda:1")
    return [parse_device(part) for part in names]


def _device_count(kind: str) -> int:
    module = getattr(torch, kind, None)
    if module is None:
        return 0
    try:
        if hasattr(module, "is_available") and not module.is_available():
            return 0
        return int(module.device_count()) if hasattr(module, "device_count") else 1
    except (RuntimeError, AssertionError):  # a build without the backend raises instead of returning 0
        return 0


def describe_present() -> str:
    """What this process can compute on, e.g. "cpu (2 threads); cuda: 1 x NVIDIA H200"."""
    found = [f"cpu ({torch.get_num_threads()} threads)"]
    for kind in ("cuda", "xpu", "npu", "mps"):
        count = _device_count(kind)
        if count:
            names = sorted({DeviceInfo.of(torch.device(kind, i)).name for i in range(count)})
            found.append(f"{kind}: {count} x {', '.join(names)}")
    return "; ".join(found)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a node reports of its device in heartbeats and `afd status`."""

    kind: str
    """The torch device string, e.g. "cuda:0" or "cpu"."""
    name: str
    """Product name ("NVIDIA H200") or, for a CPU, "cpu (N threads)"."""
    memory_bytes: int
    """Total memory of the device; for a CPU, the host's physical memory."""

    @property
    def is_accelerator(self) -> bool:
        return not self.kind.startswith(("cpu", "meta"))

    @classmethod
    def of(cls, device: torch.device) -> DeviceInfo:
        if device.type in ("cpu", "meta"):
            return cls(device.type, f"{device.type} ({torch.get_num_threads()} threads)", host_memory_bytes())
        module = getattr(torch, device.type)
        index = 0 if device.index is None else device.index
        name, memory = device.type, 0
        if hasattr(module, "get_device_properties"):
            props = module.get_device_properties(index)
            name = str(getattr(props, "name", device.type))
            memory = int(getattr(props, "total_memory", 0))
        return cls(f"{device.type}:{index}", name, memory)


def host_memory_bytes() -> int:
    """Physical memory of this host (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (benchmarks and timing; never inside the decode loop)."""
    module = getattr(torch, device.type, None)
    if device.type not in ("cpu", "meta") and module is not None and hasattr(module, "synchronize"):
        module.synchronize(device)
