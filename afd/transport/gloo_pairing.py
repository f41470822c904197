"""How the two ends of a gloo pair meet: the attention node's pair store, the rendezvous bytes, the pair's proof.

Why a group per pair rather than `init_process_group` over the cluster: a global group fixes the world
size at start-up, and FFN nodes join and leave at run time. A `ProcessGroupGloo` built directly over a
`PrefixStore` needs only the two ends, so an FFN process holds one small group per attention node that
talks to it, and a new pair costs one TCP connection. The attention node hosts a `TCPStore`
(`GlooStoreServer` in afd/transport/gloo_channel.py, one per attention node, shared by its pairs under
distinct prefixes); the rendezvous bytes carried by FfnNode.OpenChannel are that store's host, port, the
pair's key prefix and secret.

A TCPStore has no authentication: anyone who reaches its port can list, set and delete its keys, the
pair-rendezvous keys included. So the store listens on the attention node's host only (a socket bound
here and handed to the store, which would otherwise listen on every interface), and a formed pair is
authenticated before it carries a frame: each end sends an HMAC of the pair's prefix and its rank keyed
with a per-pair random secret, which travels only in the rendezvous bytes over the authenticated
control plane (FfnNode.OpenChannel). An end that cannot prove it holds the secret - a third party that
took a rank's slot in the store - is refused, and that pair never forms.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
import socket
import uuid
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroupGloo

from afd.errors import ConfigError, PeerError
from afd.transport.gloo_waits import WAITS, PairGroup, first_line
from afd.transport.rendezvous import RendezvousError, unpack_rendezvous

_PREFIX = re.compile(r"afd-gloo/[0-9a-f]{32}/")
_AUTH_TAG = 2
"""The pair's authentication messages travel on a tag of their own, before any envelope or payload."""
PAIR_SECRET_BYTES = 32
"""Random bytes of a pair's secret (sent hex-encoded in the rendezvous)."""
_SECRET = re.compile(f"[0-9a-f]{{{2 * PAIR_SECRET_BYTES}}}")


def new_pair_keys() -> tuple[str, str]:
    """A fresh key prefix and secret for one pair."""
    return f"afd-gloo/{uuid.uuid4().hex}/", secrets.token_hex(PAIR_SECRET_BYTES)


def open_store(host: str, port: int) -> dist.TCPStore:
    """A TCPStore server listening on `host`:`port` only (port 0: an ephemeral one)."""
    # TCPStore(host, ...) as a server listens on every interface whatever `host` says; a socket
    # bound to `host` and handed over (master_listen_fd, libuv backend) is the one way to scope it
    listening = _listen(host, port)
    bound_port = int(listening.getsockname()[1])
    fd = listening.detach()  # the store owns the descriptor from here on
    try:
        return dist.TCPStore(
            host,
            bound_port,
            None,
            True,
            datetime.timedelta(seconds=60),
            wait_for_workers=False,
            master_listen_fd=fd,
            use_libuv=True,
        )
    except BaseException:
        os.close(fd)
        raise


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host`:`port` only (port 0: an ephemeral one)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listening = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the gloo store address {host}:{port}: {exc}") from None
    try:
        listening.bind(address)
        listening.listen(128)
    except OSError as exc:
        listening.close()
        raise ConfigError(f"cannot listen for the gloo store on {host}:{port}: {exc}") from None
    return listening


def check_gloo_rendezvous(rendezvous: bytes) -> dict[str, Any]:
    """The fields of gloo rendezvous bytes; raises RendezvousError naming what is wrong."""
    fields = unpack_rendezvous(rendezvous, "gloo", {"host": str, "port": int, "prefix": str, "secret": str})
    host, port, prefix = fields["host"], fields["port"], fields["prefix"]
    if not 0 < port < 65536 or not _PREFIX.fullmatch(prefix) or not 0 < len(host) <= 255:
        raise RendezvousError(f"gloo rendezvous names an invalid store {host!r}:{port} / {prefix!r}")
    if not _SECRET.fullmatch(fields["secret"]):
        raise RendezvousError(f"gloo rendezvous secret must be {2 * PAIR_SECRET_BYTES} lower-case hex digits")
    return fields


def form_group(peer: str, store: dist.Store, prefix: str, rank: int, hostname: str, timeout: float) -> PairGroup:
    gloo_options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
    gloo_options._devices = [ProcessGroupGloo.create_device(hostname=hostname)]
    gloo_options._timeout = datetime.timedelta(seconds=timeout)
    try:
        return cast(PairGroup, ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, gloo_options))
    except RuntimeError as exc:
        raise PeerError(peer, f"did not form a gloo pair within {timeout:.1f}s: {first_line(exc)}") from None


def _pair_proof(secret: str, prefix: str, rank: int) -> bytes:
    """What `rank` of the pair under `prefix` sends to prove it holds the pair's secret."""
    return hmac.new(bytes.fromhex(secret), f"afd-gloo-pair {prefix} rank {rank}".encode(), hashlib.sha256).digest()


def authenticate_pair(peer: str, group: PairGroup, rank: int, secret: str, prefix: str, timeout: float) -> None:
    """Exchange proofs with the other end of a freshly formed pair; raises PeerError (and the group is
    dropped) unless the other end proves it holds the same secret.

    The proofs differ per rank and per prefix (fresh for every pair), so one seen on the wire is of no
    use for another pair or for the other rank.
    """
    mine = torch.frombuffer(bytearray(_pair_proof(secret, prefix, rank)), dtype=torch.uint8)
    theirs = torch.zeros(len(mine), dtype=torch.uint8)
    wait = datetime.timedelta(seconds=timeout)
    try:
        with WAITS.inside():
            received = group.recv([theirs], 1 - rank, _AUTH_TAG)
            sent = group.send([mine], 1 - rank, _AUTH_TAG)
            received.wait(wait)
            if not hmac.compare_digest(theirs.numpy().tobytes(), _pair_proof(secret, prefix, 1 - rank)):
                raise PeerError(peer, "gloo pair refused: the other end does not hold the pair's secret")
            sent.wait(wait)
    except PeerError:
        raise
    except RuntimeError as exc:  # gloo's errors (timeouts, a closed connection, a size mismatch)
        raise PeerError(peer, f"gloo pair not authenticated within {timeout:.1f}s: {first_line(exc)}") from None
