"""Degraded FFN nodes (stragglers) and when they come back: the router's half of afd/transport/deadlines.py.

A node becomes degraded two ways, both from measured per-node costs:
- an attention node reports it (PeerFailureReport.degraded): it missed its exchange deadlines repeatedly;
- its exchanges, as the attention nodes' heartbeats report them (CapacityProfile.peer_links), take
  `drift_factor` times longer than the pool's median (`drifted`): a throttled or overloaded node that is
  slow on every exchange but never late enough to miss a deadline.
The controller then re-plans the placement without it (its experts, or its share of a replicated expert,
move to the others at the next placement version) and lists it in Placement.degraded_nodes so attention
nodes stop waiting on it. At most `max_degraded_fraction` of the FFN pool is ever out, and never the last
node: a pool that is slow as a whole has no straggler.

Coming back (hysteresis, a circuit breaker's half-open state): a degraded node is re-admitted once it has
heartbeated regularly (no gap over `heartbeat_gap_factor` intervals) for its hold time, so a frozen node's
clock starts when it thaws. The hold starts at `hold_s` and is multiplied by `backoff` (up to `max_hold_s`)
each time the node is degraded again within `strike_memory_s` of coming back, so a node that stays slow
flaps ever more rarely. Once back it is judged afresh by the deadlines of its exchanges.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from afd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StragglerConfig:
    """When the router takes a slow FFN node out of the placement and when it brings it back."""

    enabled: bool = True
    """Act on straggler reports and drift; off: only dead nodes leave the placement."""
    hold_s: float = 10.0
    """Shortest time a degraded node stays out, heartbeating regularly throughout (first time)."""
    backoff: float = 2.0
    """The hold is multiplied by this each time a node is degraded again soon after it came back."""
    max_hold_s: float = 120.0
    """Longest hold."""
    strike_memory_s: float = 300.0
    """A node degraded again within this long after it came back gets the longer hold."""
    heartbeat_gap_factor: float = 2.5
    """A heartbeat more than this many intervals after the previous one restarts the node's hold."""
    max_degraded_fraction: float = 0.5
    """Most of the FFN pool that may be out as stragglers at once (never all of it)."""
    drift_factor: float = 3.0
    """An FFN node whose mean exchange time (attention nodes' measurements) exceeds this many times the
    pool's median is degraded; 0 turns this off."""
    drift_min_exchanges: int = 64
    """Exchanges a measurement must hold before it counts for drift (fewer is noise)."""

    def __post_init__(self) -> None:
        if self.hold_s <= 0 or self.max_hold_s < self.hold_s or self.backoff < 1.0:
            raise ConfigError("stragglers need hold_s > 0, max_hold_s >= hold_s and backoff >= 1")
        if not 0.0 < self.max_degraded_fraction < 1.0:
            raise ConfigError(f"max_degraded_fraction must be in (0, 1), got {self.max_degraded_fraction}")
        if self.drift_factor != 0 and self.drift_factor <= 1.0:
            raise ConfigError(f"drift_factor must be 0 (off) or > 1, got {self.drift_factor}")
        if self.heartbeat_gap_factor <= 1.0:
            raise ConfigError(f"heartbeat_gap_factor must be > 1, got {self.heartbeat_gap_factor}")


@dataclass(slots=True)
class _Degraded:
    reason: str
    since: float
    hold_s: float
    last_heard: float
    regular_since: float
    """Start of the current run of regular heartbeats."""


@dataclass(slots=True)
class DegradedNodes:
    """The degraded FFN nodes and their holds; `clock` is injectable (tests use a fake one)."""

    config: StragglerConfig
    heartbeat_interval_s: float
    clock: Callable[[], float] = time.monotonic
    _out: dict[str, _Degraded] = field(default_factory=dict)
    _history: dict[str, tuple[float, float]] = field(default_factory=dict)
    """node -> (when it last came back, the hold it had)."""

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._out

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._out)

    def may_degrade(self, node_id: str, pool: Iterable[str]) -> bool:
        """Whether `node_id` (in the serving FFN `pool`) may be taken out now."""
        pool = set(pool)
        if not self.config.enabled or node_id in self._out or node_id not in pool:
            return False
        out_after = len(self._out) + 1
        total = len(pool) + len(self._out)
        return len(pool) > 1 and out_after <= self.config.max_degraded_fraction * total

    def mark(self, node_id: str, reason: str) -> float:
        """Take `node_id` out; returns its hold (seconds)."""
        now = self.clock()
        hold = self.config.hold_s
        back_at, last_hold = self._history.get(node_id, (None, 0.0))
        if back_at is not None and now - back_at < self.config.strike_memory_s:
            hold = min(self.config.max_hold_s, last_hold * self.config.backoff)
        self._out[node_id] = _Degraded(reason, now, hold, now, now)
        return hold

    def heard(self, node_id: str) -> None:
        """A heartbeat of `node_id` arrived."""
        entry = self._out.get(node_id)
        if entry is None:
            return
        now = self.clock()
        if now - entry.last_heard > self.config.heartbeat_gap_factor * self.heartbeat_interval_s:
            entry.regular_since = now  # it was silent (frozen): the hold counts from now
        entry.last_heard = now

    def ready_to_return(self) -> list[str]:
        """Degraded nodes that have heartbeated regularly for their whole hold, up to now."""
        now = self.clock()
        gap = self.config.heartbeat_gap_factor * self.heartbeat_interval_s
        return [
            node
            for node, entry in self._out.items()
            if now - entry.last_heard <= gap and now - max(entry.since, entry.regular_since) >= entry.hold_s
        ]

    def returned(self, node_id: str) -> None:
        """`node_id` is back in the placement."""
        entry = self._out.pop(node_id, None)
        if entry is not None:
            self._history[node_id] = (self.clock(), entry.hold_s)

    def forget(self, node_id: str) -> None:
        """`node_id` registered again or died: it is no longer a degraded node (its strikes are kept)."""
        self._out.pop(node_id, None)

    def describe(self, node_id: str) -> dict[str, float | str] | None:
        """For `afd status`: why and since when (seconds ago) a node is out, and its hold."""
        entry = self._out.get(node_id)
        if entry is None:
            return None
        return {"reason": entry.reason, "for_s": round(self.clock() - entry.since, 1), "hold_s": entry.hold_s}


def drifted(
    exchange_us: Mapping[str, Iterable[tuple[float, int]]], factor: float, min_exchanges: int
) -> dict[str, float]:
    """FFN nodes whose measured exchanges are more than `factor` times slower than the other nodes' median.

    exchange_us: FFN node id -> (mean exchange microseconds, exchanges measured) as each attention node
    reports it. A node's figure is the median over its reporters with at least `min_exchanges`; it is
    compared with the median of the other nodes' figures (so two nodes suffice). Returns node -> that ratio.
    """
    if factor <= 0:
        return {}
    figures: dict[str, float] = {}
    for node, reports in exchange_us.items():
        counted = [mean for mean, count in reports if count >= min_exchanges and mean > 0]
        if counted:
            figures[node] = statistics.median(counted)
    out: dict[str, float] = {}
    for node, value in figures.items():
        others = [v for n, v in figures.items() if n != node]
        if others and value > factor * statistics.median(others):
            out[node] = value / statistics.median(others)
    return out
