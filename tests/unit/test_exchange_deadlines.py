"""Per-exchange deadlines, straggler misses and link fits of the attention side (afd/transport/deadlines.py),
and combine keeping the real partial sums while it counts a late node's misses (afd/transport/replies.py)."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch

from afd.errors import ConfigError, PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.deadlines import DeadlineConfig, ExchangeWatch, LinkFit, Withdrawn, link_from_transfers
from afd.transport.replies import ReplyFutureTransport


def test_link_fit_recovers_latency_and_bandwidth_by_hand():
    fit = LinkFit(window=8)
    for nbytes, seconds in [(1000, 0.002), (3000, 0.004), (5000, 0.006)]:
        fit.add(nbytes, seconds)
    link = fit.estimate()
    assert link is not None
    # seconds = 0.001 + bytes * 1e-6: 1 MB/s and 1 ms per exchange
    assert link.bytes_per_second == pytest.approx(1e6)
    assert link.latency_s == pytest.approx(0.001)
    assert link.exchanges == 3 and link.mean_seconds == pytest.approx(0.004)
    assert link.expected(2000) == pytest.approx(0.003)


def test_link_fit_of_one_size_reports_only_latency():
    fit = LinkFit(window=8)
    for seconds in (0.010, 0.012, 0.014):
        fit.add(4096, seconds)
    link = fit.estimate()
    assert link is not None and link.bytes_per_second == 0.0
    assert link.latency_s == pytest.approx(0.012)
    assert LinkFit(window=4).estimate() is None


def test_link_from_transfer_stats_rows_by_hand():
    # TransferStats.take() rows: (layer, round_trips, seconds, bytes_sent, bytes_received)
    rows = [(0, 2, 0.004, 1000, 1000), (1, 1, 0.004, 2000, 4000)]
    link = link_from_transfers(rows)
    assert link is not None
    # points (1000 B, 2 ms) and (6000 B, 4 ms): slope 0.002 / 5000 = 4e-7 s/B, intercept 2 ms - 0.4 ms
    assert link.bytes_per_second == pytest.approx(2.5e6)
    assert link.latency_s == pytest.approx(0.0016)
    assert link_from_transfers([]) is None


def _warm(watch: ExchangeWatch, nodes=("ffn-0", "ffn-1"), seconds: float = 0.01, count: int = 16) -> None:
    for i in range(count):
        watch.replied(nodes[i % len(nodes)], 1000, 1000, seconds, missed=False)


def test_deadline_comes_after_warm_up_from_the_measured_exchange_time():
    watch = ExchangeWatch(DeadlineConfig(factor=8.0, min_deadline_s=0.01, warmup_exchanges=16))
    assert watch.deadline(1000, 30.0) is None  # no measurement yet: only the failure timeout
    _warm(watch, count=15)
    assert watch.deadline(1000, 30.0) is None
    _warm(watch, count=1)
    assert watch.deadline(1000, 30.0) == pytest.approx(0.08)  # 8 x the measured 10 ms
    assert watch.deadline(1000, 0.05) is None  # never later than the failure timeout
    floor = ExchangeWatch(DeadlineConfig(min_deadline_s=0.5))
    _warm(floor)
    assert floor.deadline(1000, 30.0) == pytest.approx(0.5)
    off = ExchangeWatch(DeadlineConfig(enabled=False))
    _warm(off)
    assert off.deadline(1000, 30.0) is None


def test_repeated_misses_make_a_straggler_once_and_late_replies_do_not_raise_deadlines():
    reports: list[str] = []
    watch = ExchangeWatch(DeadlineConfig(late_limit=3, outcome_window=8), lambda node, why: reports.append(node))
    _warm(watch)
    before = watch.deadline(1000, 30.0)
    assert watch.missed(["ffn-1"], 2, 1.0) == []
    watch.replied("ffn-1", 1000, 1000, 0.01, missed=False)  # on time once in between: still in the window
    assert watch.missed(["ffn-1"], 2, 1.5) == []
    watch.replied("ffn-1", 1000, 1000, 25.0, missed=True)  # the late reply itself is not a sample
    assert watch.deadline(1000, 30.0) == before
    assert watch.missed(["ffn-1"], 2, 2.0) == ["ffn-1"]
    assert reports == ["ffn-1"] and watch.degraded_reports == 1
    # reported once: further misses count again only after it has been on time
    for _ in range(3):
        assert watch.missed(["ffn-1"], 2, 2.5) == []
    watch.replied("ffn-1", 1000, 1000, 0.01, missed=False)
    assert watch.missed(["ffn-1"], 2, 2.5) == []  # outcomes started again after the report
    watch.missed(["ffn-1"], 2, 2.5)
    assert watch.missed(["ffn-1"], 2, 2.5) == ["ffn-1"]
    assert reports == ["ffn-1", "ffn-1"]


def test_misses_are_not_counted_when_every_node_of_the_exchange_is_late():
    reports: list[str] = []
    watch = ExchangeWatch(DeadlineConfig(late_limit=1), lambda node, why: reports.append(node))
    assert watch.missed(["ffn-0", "ffn-1"], 2, 1.0) == []  # the attention node's own stall, not a straggler
    assert watch.missed(["ffn-0"], 1, 1.0) == ["ffn-0"]  # an exchange with one node: that node is late
    assert reports == ["ffn-0"]


def test_outcomes_older_than_the_window_are_forgotten_and_placement_change_resets_a_node():
    watch = ExchangeWatch(DeadlineConfig(late_limit=2, outcome_window=3))
    watch.missed(["ffn-1"], 2, 1.0)
    for _ in range(3):
        watch.replied("ffn-1", 1000, 1000, 0.01, missed=False)
    assert watch.missed(["ffn-1"], 2, 1.0) == []  # the first miss left the window
    watch.placement_changed(["ffn-0"])  # ffn-1 withdrawn: it comes back with a clean record
    assert "ffn-1" not in watch.links()
    assert watch.missed(["ffn-1"], 2, 1.0) == []


def test_deadline_config_refuses_nonsense():
    with pytest.raises(ConfigError):
        DeadlineConfig(factor=1.0)
    with pytest.raises(ConfigError):
        DeadlineConfig(late_limit=5, outcome_window=4)
    with pytest.raises(ConfigError):
        DeadlineConfig(warmup_exchanges=300, window=256)


class _ManualTransport(ReplyFutureTransport):
    """Replies are settled by the test: each dispatch's futures are kept in `sent`."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.sent: list[dict[str, concurrent.futures.Future[torch.Tensor]]] = []
        self._seq = 0

    @property
    def reply_timeout_s(self) -> float:
        return self.timeout_s

    def _send(self, node, request):
        self._seq += 1
        future: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        if not self.sent or node in self.sent[-1]:
            self.sent.append({})
        self.sent[-1][node] = future
        return self._seq, future

    def _abandon(self, futures, reason):
        for _, future in futures.values():
            if not future.done():
                future.set_exception(PeerError("?", reason))

    def set_peers(self, peers):
        pass


def _requests(nodes=("ffn-0", "ffn-1")) -> dict[str, FfnRequest]:
    return {node: FfnRequest(0, torch.zeros(2, 4)) for node in nodes}


def test_combine_keeps_waiting_past_deadlines_for_the_real_partial_and_counts_the_misses():
    reports: list[str] = []
    transport = _ManualTransport(timeout_s=10.0)
    transport.watch = ExchangeWatch(
        DeadlineConfig(factor=2.0, min_deadline_s=0.02, warmup_exchanges=2, late_limit=3),
        lambda node, why: reports.append(node),
    )
    for _ in range(2):  # warm up: two prompt exchanges
        pending = transport.dispatch(_requests())
        for future in transport.sent[-1].values():
            future.set_result(torch.ones(2, 4))
        transport.combine(pending)
    pending = transport.dispatch(_requests())
    futures = transport.sent[-1]
    futures["ffn-0"].set_result(torch.full((2, 4), 1.0))
    # ffn-1 answers after several deadline periods (a frozen node that resumes)
    late_partial = torch.full((2, 4), 7.0)
    timer = threading.Timer(0.3, futures["ffn-1"].set_result, (late_partial,))
    timer.start()
    try:
        partials = transport.combine(pending)
    finally:
        timer.cancel()
    assert torch.equal(partials["ffn-1"], late_partial)  # the real partial sum, nothing replaced
    assert reports == ["ffn-1"], "three missed deadlines make ffn-1 a straggler, reported once"


def test_a_withdrawn_node_ends_the_wait_with_withdrawn():
    transport = _ManualTransport(timeout_s=10.0)
    pending = transport.dispatch(_requests())
    transport.sent[-1]["ffn-0"].set_result(torch.ones(2, 4))
    timer = threading.Timer(0.05, transport.withdraw_peer, ("ffn-1", "moved away"))
    timer.start()
    with pytest.raises(Withdrawn) as caught:
        transport.combine(pending)
    assert caught.value.peer == "ffn-1"
