"""Transports that carry FfnRequests to FFN nodes and partial sums back (one interface, several backends)."""

from afd.transport.base import FfnComputer, FfnTransport, PendingCombine
from afd.transport.inprocess import InProcessTransport

__all__ = ["FfnComputer", "FfnTransport", "InProcessTransport", "PendingCombine"]
