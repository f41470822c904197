"""NCCL data plane for GPU nodes: a ctypes binding of libnccl (library.py), one non-blocking communicator
(communicator.py), how a pair meets (pairing.py), a frame's first message (first_message.py) and the
pairwise channel (channel.py, with its shared state in channel_base.py and its two directions in sending.py
and receiving.py).

Importing this package needs neither a GPU nor libnccl; using it does, and says so with
NcclUnavailableError (`unavailable_reason()` tells ahead of time, e.g. for a test skip or a CLI).
`python -m afd.transport.nccl.selftest` prints send/recv bandwidth on a CUDA machine.
"""

from afd.transport.nccl.channel import NcclChannel, NcclListener, NcclOptions, connect_nccl
from afd.transport.nccl.library import (
    NcclError,
    NcclLibrary,
    NcclUnavailableError,
    load_library,
    nccl_dtype,
    unavailable_reason,
)
from afd.transport.nccl.pairing import PAIR_ID_BYTES, check_nccl_rendezvous, nccl_rendezvous

__all__ = [
    "PAIR_ID_BYTES",
    "NcclChannel",
    "NcclError",
    "NcclLibrary",
    "NcclListener",
    "NcclOptions",
    "NcclUnavailableError",
    "check_nccl_rendezvous",
    "connect_nccl",
    "load_library",
    "nccl_dtype",
    "nccl_rendezvous",
    "unavailable_reason",
]
