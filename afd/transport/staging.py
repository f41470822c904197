"""Host staging of device tensors for the host transports (gRPC, gloo, shm), and moving received ones back.

A frame on a host transport is bytes in host memory: the gRPC message, the gloo message, the shm ring.
A node computing on an accelerator must therefore bring its tensors to the host before they are framed,
and this module is the one place that does it, so that no transport reads device memory on its own
(no `.numpy()`, `.cpu()` or `.to("cpu")` of a device tensor anywhere in the send paths).

Why pinned, non-blocking copies, then one synchronize:
- A copy from device memory into *pageable* host memory is synchronous and goes through the driver's
  own bounce buffer (device -> pinned bounce -> pageable), tensor by tensor: two copies, and the host
  waits for each. Into *page-locked* (pinned) memory the DMA engine writes directly, once, and the copy
  can be queued with `non_blocking=True` behind the kernels that produce the tensor.
- So every device tensor of a frame is queued as one non-blocking copy into a pinned buffer, and one
  event, recorded on the current stream after the last copy, is waited for before any byte is read:
  one host synchronisation per frame, not one per tensor, and the copies of a frame's tensors run back
  to back on the copy engine.
- Pinning memory is expensive (a driver call that locks pages), so a channel direction keeps one
  staging buffer (`HostStaging`) and reuses it, growing it (to the next power of two) only when a frame
  does not fit. Its views are valid while `HostStaging.host_tensors` is held: the sender copies them into
  its wire (gRPC message, ring, gloo envelope) inside that block. A sender whose wire reads the bytes
  after `send` returns (gloo's posted large messages) uses `stage_once`, a buffer per frame from torch's
  caching pinned allocator, which keeps the block until the tensors that view it are freed.

CPU tensors are not touched: `host_tensors` and `stage_once` hand the very same tensor objects back (no
copy, no allocation, no synchronisation), so a CPU node's send path is exactly what it was.

`meta` tensors have no data, so there is nothing to stage: they are refused with `StagingError` (a node
on the meta device can use the in-process transport, which never serialises).

Receiving: a host transport decodes a frame on the CPU as before; `to_device(tensor, device)` moves it to
the consumer's device with a non-blocking copy (queued on the caller's current stream, so work the caller
queues afterwards sees the data), and leaves it where it is when it is already there. The attention side
gets its partial sums on its device by giving its transport a `device` (ChannelTransportConfig.device,
GrpcTransportConfig.device, InProcessTransport(device=...), make_transport(device=...)): `combine` then
returns them there. An FFN node moves a decoded request with `request_to_device(request, device)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from afd.errors import AfdError
from afd.ffn_messages import FfnRequest

__all__ = [
    "ALIGNMENT",
    "HostStaging",
    "StagingError",
    "needs_staging",
    "request_to_device",
    "same_device",
    "stage_once",
    "to_device",
]

ALIGNMENT = 64
"""Each staged tensor starts at a multiple of this in the staging buffer (every dtype's view is aligned)."""
MIN_BUFFER_BYTES = 1 << 16
"""Smallest staging buffer pinned (a decode microbatch of a small model fits; fewer regrowths)."""


class StagingError(AfdError, ValueError):
    """A tensor cannot be brought to the host for a frame (a meta tensor: it has no data)."""


def needs_staging(tensor: torch.Tensor) -> bool:
    """True for a tensor that lives off the host (raises StagingError for a meta tensor)."""
    kind = tensor.device.type
    if kind == "meta":
        raise StagingError(
            f"a meta tensor {list(tensor.shape)} {tensor.dtype} has no data to send over a host transport; "
            "a node on the meta device can only use the in-process transport"
        )
    return kind != "cpu"


def same_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" without an index means the current one, as torch does)."""
    if tensor.device.type != device.type:
        return False
    if device.type in ("cpu", "meta") or device.index == tensor.device.index:
        return True
    return device.index is None and tensor.device.index == _current_index(device.type)


def _current_index(kind: str) -> int | None:
    current = getattr(getattr(torch, kind, None), "current_device", None)
    try:
        return int(current()) if callable(current) else None
    except (RuntimeError, AssertionError, ValueError, TypeError):
        return None


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`tensor` on `device`: itself when `device` is None or it is already there, else a copy (non-blocking
    unless to the CPU).

    The copy is queued on the caller's current stream, so work the caller queues after this call reads the
    data in order, and the host does not wait. From pinned memory the copy is a direct DMA; from pageable
    memory (a decoded gRPC / shm frame) the driver bounces it through its own pinned buffer before
    returning, so the source may be dropped at once either way. `device` "meta" gives a meta tensor of the
    same shape and dtype (tests and dry runs). A CUDA tensor already on `device` is marked as used by the
    caller's current stream (see the comment below) and returned as it is."""
    if device is None:
        return tensor
    target = torch.device(device)
    if same_device(tensor, target):
        if tensor.is_cuda:
            # Received on another stream (an NCCL channel's receive stream, allocated there): the caching
            # allocator must not hand this memory to the next receive before the caller's queued work on
            # its own stream is done with it. The channel records the receiving thread's stream; this is
            # the consumer's, which is the one that matters when the consumer computes on a side stream.
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return tensor
    # To the host (a CPU consumer of an NCCL partial): blocking, since the host reads the data next and a
    # non-blocking device-to-host copy returns a pinned tensor before its bytes have arrived.
    return tensor.to(target, non_blocking=target.type != "cpu")


def request_to_device(request: FfnRequest, device: torch.device | str | None) -> FfnRequest:
    """`request` with every tensor on `device` (itself when None or they are all there already): what an
    FFN node on an accelerator does with a request decoded from a host frame (non-blocking copies)."""
    if device is None:
        return request

    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else to_device(tensor, device)

    moved = dataclasses.replace(
        request,
        hidden=to_device(request.hidden, device),
        hidden_scale=move(request.hidden_scale),
        expert_ids=move(request.expert_ids),
        expert_weights=move(request.expert_weights),
        shared_scale=move(request.shared_scale),
    )
    fields = ("hidden", "hidden_scale", "expert_ids", "expert_weights", "shared_scale")
    return request if all(getattr(moved, f) is getattr(request, f) for f in fields) else moved


def _allocate_host(nbytes: int) -> tuple[torch.Tensor, bool]:
    """`nbytes` of page-locked host memory (torch's caching host allocator) and True, or pageable memory and
    False where this torch build has no pinned allocator (then the copies below are synchronous ones)."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), True
    except RuntimeError:
        return torch.empty(nbytes, dtype=torch.uint8), False


def _wait_for_copies(device: torch.device) -> None:
    """Block until the copies queued on `device`'s current stream so far are done: one event, one wait."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        event.synchronize()
        return
    module = torch.get_device_module(device.type)
    current_stream = getattr(module, "current_stream", None)
    if current_stream is not None and hasattr(torch, "Event"):
        generic = torch.Event(device=device.type)
        generic.record(current_stream(device))
        generic.synchronize()
    elif hasattr(module, "synchronize"):
        module.synchronize(device)


def _stage(
    tensors: Sequence[torch.Tensor], buffer_for: Callable[[int], tuple[torch.Tensor, bool]]
) -> list[torch.Tensor]:
    """CPU tensors standing for `tensors`: the CPU ones themselves, the device ones as views of the buffer
    `buffer_for(total bytes)` returns, filled by non-blocking copies and waited for once."""
    off_host = [needs_staging(t) for t in tensors]
    if not any(off_host):
        return list(tensors)
    offsets: list[int] = []
    total = 0
    for tensor, staged in zip(tensors, off_host, strict=True):
        offsets.append(total)
        if staged:
            total += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
    buffer, non_blocking = buffer_for(total)  # non-blocking only into pinned memory: see the module docstring
    out: list[torch.Tensor] = []
    devices: list[torch.device] = []
    for tensor, staged, offset in zip(tensors, off_host, offsets, strict=True):
        if not staged:
            out.append(tensor)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        host = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        if nbytes:
            host.copy_(tensor.detach(), non_blocking=non_blocking)  # a strided source is gathered by the copy
            if tensor.device not in devices:
                devices.append(tensor.device)
        out.append(host)
    if non_blocking:
        for device in devices:
            _wait_for_copies(device)
    return out


def stage_once(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """CPU tensors for `tensors` in a staging buffer of their own (from torch's caching pinned allocator):
    for a sender whose wire reads the bytes after it returns, or that keeps no `HostStaging`. CPU tensors
    come back unchanged."""
    return _stage(tensors, _allocate_host)


class HostStaging:
    """The reused pinned staging buffer of one channel direction (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._pinned = False
        self._lock = threading.Lock()
        self.allocations = 0
        """How many times a buffer was pinned (first use and each growth); for tests and diagnostics."""

    @property
    def capacity(self) -> int:
        """Bytes of the current staging buffer (0 before the first device frame)."""
        return 0 if self._buffer is None else self._buffer.numel()

    def _buffer_for(self, total: int) -> tuple[torch.Tensor, bool]:
        if self._buffer is None or self._buffer.numel() < total:
            size = max(MIN_BUFFER_BYTES, 1 << max(total - 1, 0).bit_length())
            self._buffer = None  # the old block goes back to torch's pinned cache before the new one is taken
            self._buffer, self._pinned = _allocate_host(size)
            self.allocations += 1
        return self._buffer, self._pinned

    @contextlib.contextmanager
    def host_tensors(self, tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """CPU tensors for `tensors`, valid inside the block: CPU ones unchanged, device ones staged.

        Copy them into the wire before the block ends: the next frame of this direction reuses the buffer
        (the block holds the direction's lock, so concurrent senders take turns)."""
        if not any(needs_staging(t) for t in tensors):
            yield list(tensors)  # the CPU path: no lock, no copy
            return
        with self._lock:
            yield _stage(tensors, self._buffer_for)
