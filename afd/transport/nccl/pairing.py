"""How the two ends of an NCCL pair meet: the pair id, its rendezvous bytes, and forming its communicators.

Set-up. The attention node calls `NcclChannel.create_unique_id()` and sends the bytes to the FFN node in
FfnNode.OpenChannel (as `NcclListener.rendezvous`); both sides then build `NcclChannel(peer, unique_id,
rank, device)`, which returns once the pair has formed or fails with PeerError after
`NcclOptions.connect_timeout`. No world size beyond the pair exists, so FFN nodes come and go freely.

Two communicators per pair, one per direction. The id is two ncclUniqueIds: attention->FFN and
FFN->attention. With a single communicator, the sending thread and the receiving thread would share
it, and an NCCL communicator is not thread-safe; worse, NCCL runs the kernels of one communicator in
issue order, so a receive posted while waiting for a reply would hold back the next request's send
behind it, and the pair would deadlock. One communicator per direction makes each one single-threaded
and its operations strictly ordered. So "one communicator per attention/FFN pair" (DESIGN.md) is, exactly,
one pair of two-rank communicators per attention/FFN pair, formed when a placement first names the FFN
node (FfnNode.OpenChannel) and aborted when the channel closes; no communicator spans more than the pair.
"""

from __future__ import annotations

import contextlib
import time

import torch

from afd.errors import PeerError
from afd.transport.nccl.communicator import Communicator, poll_until
from afd.transport.nccl.library import NCCL_UNIQUE_ID_BYTES, NcclError, NcclLibrary
from afd.transport.rendezvous import RendezvousError, pack_rendezvous, unpack_rendezvous

PAIR_ID_BYTES = 2 * NCCL_UNIQUE_ID_BYTES
"""A pair's unique id: the ncclUniqueId of the attention->FFN communicator, then the FFN->attention one."""


def form_communicators(
    peer: str, library: NcclLibrary, device: torch.device, members: list[tuple[bytes, int, int]], timeout: float
) -> list[Communicator]:
    """Form one communicator per (unique id, rank, nranks), concurrently; PeerError if not within `timeout`.

    Non-blocking init is what makes this bounded, and what lets both communicators of a pair form in
    either order on the two sides.
    """
    comms: list[Communicator] = []
    deadline = time.monotonic() + timeout
    try:
        with torch.cuda.device(device):
            for unique_id, rank, nranks in members:
                comms.append(Communicator.begin(library, unique_id, rank, nranks))
            if all(poll_until(comm.ready, deadline) for comm in comms):
                return comms
        reason = f"did not join the NCCL pair within {timeout:.1f}s"
    except NcclError as exc:
        reason = f"NCCL pair failed to form: {exc}"
    with torch.cuda.device(device):
        for comm in comms:
            with contextlib.suppress(NcclError):
                comm.abort()
    raise PeerError(peer, reason)


def nccl_rendezvous(unique_id: bytes) -> bytes:
    """The rendezvous bytes of FfnNode.OpenChannel for a pair id."""
    return pack_rendezvous("nccl", {"unique_id": unique_id.hex()})


def check_nccl_rendezvous(rendezvous: bytes) -> bytes:
    """The pair id carried by NCCL rendezvous bytes; RendezvousError naming what is wrong."""
    fields = unpack_rendezvous(rendezvous, "nccl", {"unique_id": str})
    try:
        unique_id = bytes.fromhex(fields["unique_id"])
    except ValueError:
        raise RendezvousError("nccl rendezvous field 'unique_id' is not hex") from None
    if len(unique_id) != PAIR_ID_BYTES:
        raise RendezvousError(f"nccl rendezvous carries a {len(unique_id)}-byte id, expected {PAIR_ID_BYTES}")
    return unique_id
