"""NCCL data plane for GPU nodes: a ctypes binding of libnccl (library.py) and a pairwise channel (channel.py).

Importing this package needs neither a GPU nor libnccl; using it does, and says so with
NcclUnavailableError (`unavailable_reason()` tells ahead of time, e.g. for a test skip or a CLI).
`python -m afd.transport.nccl.selftest` prints send/recv bandwidth on a CUDA machine.
"""

from afd.transport.nccl.channel import (
    PAIR_ID_BYTES,
    NcclChannel,
    NcclListener,
    NcclOptions,
    check_nccl_rendezvous,
    connect_nccl,
    nccl_rendezvous,
)
from afd.transport.nccl.library import (
    NcclError,
    NcclLibrary,
    NcclUnavailableError,
    load_library,
    nccl_dtype,
    unavailable_reason,
)

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
