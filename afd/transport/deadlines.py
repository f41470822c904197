"""Per-exchange deadlines and link estimates from the data plane's own timings (attention side).

Why: before this, nothing bounded an attention node's wait on a slow FFN node but the failure timeout
(30 s), and the router's microbatch plan never saw the link (CapacityProfile.link_bytes_per_second was
never set). Both come from one measurement: for every reply, the seconds from handing the request to the
transport to the reply's arrival, and the bytes both ways. That is the cost the attention node sees per
exchange: both transfers plus the FFN compute.

Design (one mechanism for stragglers and for measured link costs):
- Fit. Per peer, and over the whole pool, a least-squares fit `seconds = latency + bytes / bandwidth` over
  the recent on-time replies (`LinkFit`). Where the sizes do not vary enough to fit a slope (decode traffic
  of one batch size), the whole mean time is reported as latency and the bandwidth as unknown (0). The fit
  includes the FFN compute that grows with the tokens, so `bandwidth` is the exchange's effective rate, not
  the wire's; the planner's link term is therefore an upper bound of the transfer time. Late replies never
  enter a fit, so a straggler cannot raise the deadlines it is judged by.
- Deadline. After `warmup_exchanges` on-time replies, an exchange of x bytes is due within
  `max(min_deadline_s, factor * expected(x))`, expected from the pool fit (the measured per-layer FFN
  exchange time at that size), and never later than the failure timeout.
- What a missed deadline does: nothing to the tokens. Combine keeps waiting for the real partial sum (up to
  the failure timeout, as before), and each deadline that passes with a node still pending counts one miss
  for that node (a frozen node keeps missing, one per deadline period; a throttled one misses once per late
  exchange). A miss is not counted when every node of a multi-node exchange is pending: that is the
  attention node's own stall or the network, not a straggler. `late_limit` misses among a node's last
  `outcome_window` outcomes (an on-time reply is an outcome too) make it a straggler: `on_degraded` is
  called once (the attention node reports it to the router), and not again until the node has replied on
  time once more (or left the placement and come back): a frozen node is reported once, not every period.
- Tokens stay identical because no partial sum is ever replaced or skipped: the router moves the degraded
  node's experts (or its share of a replicated expert) to the other nodes at the next placement version,
  whose FFN nodes load them before any attention node switches; the new placement lists the node in
  `degraded_nodes`, the attention node fails what it still awaits from it (`Withdrawn`), the step ends and
  re-runs under the new placement (KV writes of a step are idempotent, lightning states are restored: the
  same path as a dead node's, attn_nodes/engine_thread.py) without reporting a failure. If the router
  cannot move the experts (no other node), the step waits up to the failure timeout, as before.
- Recovery is the router's (router/stragglers.py): hysteresis on regular heartbeats, then the node comes
  back in a new placement and this side starts its outcomes afresh (`placement_changed`).

Thread safety: `replied` runs on the transports' receiver threads, the rest on the engine thread; one lock.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from afd.errors import ConfigError, PeerError


class Withdrawn(PeerError):
    """What an attention node awaited from an FFN node the router withdrew as a straggler: the step is
    re-run on the new placement, and this is not a failure to report."""


@dataclass(frozen=True, slots=True)
class DeadlineConfig:
    """How an attention node derives per-exchange deadlines and decides an FFN node is a straggler."""

    enabled: bool = True
    """Count deadline misses and report stragglers; off: only the failure timeout bounds a wait."""
    factor: float = 8.0
    """An exchange is late after this many times its expected time (the pool fit at its size)."""
    min_deadline_s: float = 0.5
    """Floor of every deadline: scheduling noise of a loaded host is tens of milliseconds, never a miss."""
    warmup_exchanges: int = 16
    """On-time replies the pool fit needs before deadlines apply (until then: the failure timeout only)."""
    window: int = 256
    """Replies each fit is made from (the most recent)."""
    late_limit: int = 3
    """Misses among a node's last `outcome_window` outcomes that make it a straggler."""
    outcome_window: int = 16
    """Outcomes (on-time replies and misses) remembered per node."""

    def __post_init__(self) -> None:
        if self.factor <= 1.0 or self.min_deadline_s <= 0:
            raise ConfigError(
                f"deadlines need factor > 1 and min_deadline_s > 0, got {self.factor} and {self.min_deadline_s}"
            )
        if self.warmup_exchanges < 2 or self.window < self.warmup_exchanges:
            raise ConfigError("deadlines need 2 <= warmup_exchanges <= window")
        if not 1 <= self.late_limit <= self.outcome_window:
            raise ConfigError("deadlines need 1 <= late_limit <= outcome_window")


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """One link (or the pool) as measured: `seconds = latency_s + bytes / bytes_per_second`."""

    bytes_per_second: float
    """Effective rate of the exchange's bytes (both ways); 0 when the sizes did not vary enough to fit it."""
    latency_s: float
    """Fixed cost per exchange; the whole mean time when bytes_per_second is 0."""
    exchanges: int
    """Replies the fit is made from."""
    mean_seconds: float
    """Mean send-to-reply time of those replies."""

    def expected(self, nbytes: float) -> float:
        """Predicted seconds of an exchange of `nbytes` (both ways)."""
        return self.latency_s + (nbytes / self.bytes_per_second if self.bytes_per_second > 0 else 0.0)


MIN_SIZE_SPREAD = 0.1
"""Coefficient of variation of the exchange sizes below which no slope is fitted (it would be noise)."""


class LinkFit:
    """Least-squares fit of exchange seconds against bytes over the last `window` samples."""

    def __init__(self, window: int) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, nbytes: float, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds) and nbytes >= 0:
            self.samples.append((float(nbytes), float(seconds)))

    def __len__(self) -> int:
        return len(self.samples)

    def estimate(self) -> LinkEstimate | None:
        """The fit, or None without samples. A fitted intercept below 0 is clamped to 0 (the slope kept)."""
        n = len(self.samples)
        if n == 0:
            return None
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in self.samples)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in self.samples)
        spread = math.sqrt(sxx / n) / mean_x if mean_x > 0 else 0.0
        if n >= 2 and spread >= MIN_SIZE_SPREAD and sxy > 0:
            slope = sxy / sxx
            return LinkEstimate(1.0 / slope, max(0.0, mean_y - slope * mean_x), n, mean_y)
        return LinkEstimate(0.0, mean_y, n, mean_y)


class ExchangeWatch:
    """Deadlines, misses and link fits of one attention node's exchanges (see the module docstring)."""

    def __init__(
        self,
        config: DeadlineConfig | None = None,
        on_degraded: Callable[[str, str], None] | None = None,
    ) -> None:
        """on_degraded(node, reason): called (from the thread that counted the last miss, without the lock
        held) when `node` becomes a straggler."""
        self.config = config or DeadlineConfig()
        self.on_degraded = on_degraded
        self._lock = threading.Lock()
        self._pool = LinkFit(self.config.window)
        self._peers: dict[str, LinkFit] = {}
        self._outcomes: dict[str, deque[bool]] = {}
        """node -> recent outcomes, True = a missed deadline."""
        self._reply_ratio = 2.0
        """(sent + received) / sent bytes of recent replies: predicts an exchange's size at dispatch."""
        self.degraded_reports = 0
        """How many times a node was found a straggler (monotonic)."""
        self._reported: set[str] = set()
        """Stragglers reported and not on time since: their misses are not counted again."""

    # ---- deadlines ---------------------------------------------------------------------------------------
    def deadline(self, sent_bytes: int, failure_timeout_s: float) -> float | None:
        """Seconds after dispatch an exchange of `sent_bytes` is late; None before warm-up or when disabled
        (or when the deadline would not come before `failure_timeout_s`)."""
        config = self.config
        if not config.enabled:
            return None
        with self._lock:
            if len(self._pool) < config.warmup_exchanges:
                return None
            fit = self._pool.estimate()
            ratio = self._reply_ratio
        assert fit is not None
        due = max(config.min_deadline_s, config.factor * fit.expected(sent_bytes * ratio))
        return due if due < failure_timeout_s else None

    def replied(self, node: str, sent_bytes: int, received_bytes: int, seconds: float, missed: bool) -> None:
        """A reply of `node` came `seconds` after dispatch; `missed`: a deadline of it had passed already."""
        total = sent_bytes + received_bytes
        with self._lock:
            if missed:
                return  # its miss is counted; a late time must not raise the deadlines
            self._pool.add(total, seconds)
            self._peers.setdefault(node, LinkFit(self.config.window)).add(total, seconds)
            if sent_bytes > 0:
                self._reply_ratio = 0.9 * self._reply_ratio + 0.1 * (total / sent_bytes)
            self._outcome(node, late=False)
            self._reported.discard(node)

    def missed(self, pending: Iterable[str], exchange_nodes: int, waited_s: float) -> list[str]:
        """A deadline passed while `pending` (of an exchange with `exchange_nodes` nodes) had not replied.

        Returns the nodes this made stragglers (on_degraded was called for each).
        """
        pending = list(pending)
        if not self.config.enabled or not pending or (exchange_nodes > 1 and len(pending) == exchange_nodes):
            return []
        degraded: list[str] = []
        with self._lock:
            for node in pending:
                if node not in self._reported and self._outcome(node, late=True):
                    degraded.append(node)
                    self._reported.add(node)
        for node in degraded:
            self.degraded_reports += 1
            if self.on_degraded is not None:
                reason = (
                    f"missed {self.config.late_limit} exchange deadlines of its last {self.config.outcome_window} "
                    f"(latest: no reply after {waited_s:.2f} s)"
                )
                self.on_degraded(node, reason)
        return degraded

    def _outcome(self, node: str, late: bool) -> bool:
        """Record one outcome (lock held); True when it makes `node` a straggler (its outcomes restart)."""
        outcomes = self._outcomes.setdefault(node, deque(maxlen=self.config.outcome_window))
        outcomes.append(late)
        if late and sum(outcomes) >= self.config.late_limit:
            outcomes.clear()
            return True
        return False

    def placement_changed(self, nodes: Iterable[str]) -> None:
        """The attention node switched to a placement of `nodes`: forget the others' outcomes and fits, so
        a node that comes back is judged on what it does from then on."""
        keep = set(nodes)
        with self._lock:
            for table in (self._outcomes, self._peers):
                for node in [n for n in table if n not in keep]:
                    del table[node]
            self._reported &= keep

    # ---- link estimates ----------------------------------------------------------------------------------
    def links(self) -> dict[str, LinkEstimate]:
        """Per peer, the fit of its recent on-time replies."""
        with self._lock:
            fits = {node: fit.estimate() for node, fit in self._peers.items()}
        return {node: fit for node, fit in fits.items() if fit is not None}

    def pool(self) -> LinkEstimate | None:
        """The fit over every peer (what deadlines are derived from)."""
        with self._lock:
            return self._pool.estimate()


def link_from_transfers(rows: Iterable[tuple[int, int, float, int, int]]) -> LinkEstimate | None:
    """A link estimate from TransferStats.take() rows `(layer, round_trips, seconds, bytes_sent, bytes_received)`.

    Each row is one point: mean bytes (both ways) and mean seconds per exchange of that layer. For the
    heartbeat's aggregate view when no per-peer timings exist (e.g. an in-process transport).
    """
    fit = LinkFit(window=1 << 16)
    for _, trips, seconds, sent, received in rows:
        if trips > 0:
            fit.add((sent + received) / trips, seconds / trips)
    return fit.estimate()
