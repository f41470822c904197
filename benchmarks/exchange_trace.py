"""The hops of each attention -> FFN -> attention exchange, from the node processes' traces (afd/exchange_trace.py).

`afd bench cluster --trace-exchanges DIR ...` runs every cluster with AFD_EXCHANGE_TRACE set to a folder per m
and round, then reads them here: events are matched by the frame's sequence number (the attention node's
send and reply, the FFN node's read and encode) and by order within a thread (a combine follows its send),
and each exchange splits into the hops below. Times are wall clock per hop (median, p90 in ms over every
exchange of the run); "CPU" is what the sending thread itself computed in `send`, which on a shared host
tells work from waiting for a core. Any m and any number of FFN nodes are matched the same way (a frame
batched with others gets its batch's compute); one attention node per run.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.table import Table

HOPS: dict[str, str] = {
    "attention half": "the layer's attention half, gate and request building, up to the transport's send",
    "send": "encoding the request and writing it to the channel (attention node)",
    "send -> frame read": "the FFN node's receive thread wakes and reads and decodes the frame",
    "frame read -> compute": "from the decoded frame to the start of its compute (a handoff, if any)",
    "compute": "the FFN node's compute of the batch holding the request",
    "computed -> encoded": "the reply frame is encoded",
    "encoded -> reply read": "the reply is sent, and the attention node's receive thread wakes and reads it",
    "reply read -> combined": "the waiting attention thread wakes, takes the partial sum and adds it",
    "exchange": "send to combined: what the attention node's layer waited for in all",
}
"""Each hop of an exchange, in order; "overhead" in the results is the sum of all but the attention half,
the compute and the exchange itself (what the split costs beyond the two halves' own work)."""


def _events(path: Path) -> list[tuple[float, str, int, float]]:
    out = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 4:
            out.append((float(fields[0]), fields[1], int(fields[2]), float(fields[3])))
    return out


def _attention_exchanges(events: Iterable[tuple[float, str, int, float]]) -> dict[int, dict[str, float]]:
    """seq -> the attention node's times of the exchange that sent it.

    A dispatch (one microbatch's layer) sends one frame per FFN node it needs; combines come in the order of
    the dispatches (the runner's wavefront invariant), so the n-th `combined` closes the n-th dispatch."""
    dispatches: collections.deque[dict[str, Any]] = collections.deque()
    current: dict[str, Any] = {}
    replies: dict[int, float] = {}
    done: list[dict[str, Any]] = []
    for clock, name, key, cpu in events:
        if name == "attn_half":
            current = {"attn_half": clock, "seqs": []}
            dispatches.append(current)
        elif name == "send" and "attn_half" in current:
            current.setdefault("send", clock)
            current.setdefault("send_cpu", cpu)
        elif name == "sent" and "send" in current:
            current.update(sent=clock, sent_cpu=cpu)
            current["seqs"].append(key)
        elif name == "reply_read":
            replies[key] = clock
        elif name == "combined" and dispatches:
            closed = dispatches.popleft()
            closed["combined"] = clock
            done.append(closed)
    by_seq: dict[int, dict[str, float]] = {}
    for dispatch in done:
        for seq in dispatch["seqs"]:
            if seq in replies:
                times = {k: v for k, v in dispatch.items() if k != "seqs"}
                by_seq[seq] = {**times, "reply_read": replies[seq]}
    return by_seq


def _ffn_exchanges(events: Iterable[tuple[float, str, int, float]]) -> dict[int, dict[str, float]]:
    """seq -> the FFN node's times of that frame."""
    by_seq: dict[int, dict[str, float]] = {}
    batch: tuple[float, float] | None = None
    started = 0.0
    for clock, name, key, _ in events:
        if name == "frame_read":
            by_seq[key] = {"frame_read": clock}
        elif name == "compute":
            started = clock
        elif name == "computed":
            batch = (started, clock)
        elif name == "encoded" and key in by_seq and batch is not None:
            by_seq[key].update(compute=batch[0], computed=batch[1], encoded=clock)
    return by_seq


def analyze(directories: Iterable[Path]) -> dict[str, Any]:
    """Hop statistics over the traces of `directories`, each written by one cluster (sequence numbers restart
    with every attention node, so each folder is matched on its own and the hops are pooled)."""
    hops: dict[str, list[float]] = {hop: [] for hop in HOPS}
    send_cpu: list[float] = []
    for directory in directories:
        attention: dict[int, dict[str, float]] = {}
        ffn: dict[int, dict[str, float]] = {}
        for path in sorted(directory.glob("trace-*.txt")):
            events = _events(path)
            names = {event[1] for event in events}
            if "sent" in names:
                attention.update(_attention_exchanges(events))
            if "frame_read" in names:
                ffn.update(_ffn_exchanges(events))
        for seq, a in attention.items():
            f = ffn.get(seq)
            if f is None or "encoded" not in f:
                continue
            times = {
                "attention half": a["send"] - a["attn_half"],
                "send": a["sent"] - a["send"],
                "send -> frame read": f["frame_read"] - a["sent"],
                "frame read -> compute": f["compute"] - f["frame_read"],
                "compute": f["computed"] - f["compute"],
                "computed -> encoded": f["encoded"] - f["computed"],
                "encoded -> reply read": a["reply_read"] - f["encoded"],
                "reply read -> combined": a["combined"] - a["reply_read"],
                "exchange": a["combined"] - a["send"],
            }
            if min(times.values()) < 0:  # matched to a batch that began before the frame was read: not its own
                continue
            for hop, seconds in times.items():
                hops[hop].append(seconds)
            send_cpu.append(a["sent_cpu"] - a["send_cpu"])
    result: dict[str, Any] = {"exchanges": len(send_cpu), "hops_ms": {}}
    if send_cpu:
        result["hops_ms"] = {hop: _stats(values) for hop, values in hops.items()}
        result["send_cpu_ms"] = _stats(send_cpu)
        between = [hops[hop] for hop in HOPS if hop not in ("attention half", "compute", "exchange")]
        result["overhead_ms"] = _stats([sum(parts) for parts in zip(*between, strict=True)])
    return result


def analyze_rounds(parent: Path) -> dict[str, Any]:
    """`analyze` of every cluster folder `afd bench cluster --trace-exchanges` wrote under `parent` (one m)."""
    return analyze(sorted(path for path in parent.glob("cluster-*") if path.is_dir()))


def table(hops_by_m: dict[int, dict[str, Any]]) -> Table:
    """The hop table: one column per m, median (p90) ms per hop."""
    out = Table(title="Where an exchange's time goes (ms per layer and microbatch, median (p90))")
    out.add_column("hop")
    for m in hops_by_m:
        out.add_column(f"m={m} ({hops_by_m[m]['exchanges']} exchanges)", justify="right")
    rows = [*HOPS, "overhead", "send CPU"]
    for hop in rows:
        cells = []
        for result in hops_by_m.values():
            if hop == "overhead":
                stats = result.get("overhead_ms")
            elif hop == "send CPU":
                stats = result.get("send_cpu_ms")
            else:
                stats = result["hops_ms"].get(hop)
            cells.append(f"{stats['p50']:.3f} ({stats['p90']:.3f})" if stats else "-")
        out.add_row(hop, *cells)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1e3, 3),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
    }
