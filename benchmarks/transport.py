"""`afd bench transport`: bandwidth and latency of a data-plane transport, in the style of nccl-tests.

Patterns (payloads are bfloat16 hidden states; `size` is the bytes of one frame):
- sendrecv: one sender process streams frames to one receiver process. time = seconds per frame,
  algbw = busbw = size / time.
- m2n: M sender processes (attention nodes) each send one frame to each of N receiver processes (FFN
  nodes) per iteration — every token's hidden state once per receiving node. time = seconds per
  iteration (the slowest sender), algbw = N * size / time (what one attention node pushes),
  busbw = M * N * size / time (everything crossing the fabric).

Baselines measured in the same run: the same pattern over plain blocking TCP sockets (`sendall` /
`recv_into` a preallocated buffer) and, for one machine, a single-threaded memcpy of `size` bytes.
Every row carries `ratio_vs_tcp` (and `ratio_vs_memcpy` for shm). Finally sender 0 and receiver 0
ping-pong a 64 KiB frame: p50/p99 one-way latency (half the round trip) for the transport and for TCP.
The figures are what the router's planner uses as link bandwidth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.transport_links import (
    PAYLOAD_DTYPE,
    Plan,
    inproc_pair,
    percentile,
    plan_json,
    run_receiver,
    run_sender,
)

TRANSPORTS = ("grpc", "gloo", "nccl", "shm", "inproc")
PATTERNS = ("sendrecv", "m2n")
REPO_ROOT = Path(__file__).resolve().parents[1]
LATENCY_BYTES = 64 * 1024
TARGET_BYTES_PER_SIZE = 64 * 2**20
"""Timed bytes per link and size (bounded by MIN/MAX_ITERS): keeps a full sweep to a few seconds."""
MIN_ITERS, MAX_ITERS = 3, 200
WORKER_TIMEOUT_S = 300.0


class BenchError(RuntimeError):
    """The benchmark could not run (a worker failed, the transport is unavailable)."""


@dataclass(slots=True)
class Measured:
    """What one transport did over one sweep."""

    seconds: dict[int, float] = field(default_factory=dict)
    """Size -> seconds per iteration (slowest sender)."""
    latency_us: list[float] = field(default_factory=list)
    """One-way latency samples of the ping-pong probe."""


def make_plan(min_bytes: int, max_bytes: int, factor: int, latency_iters: int, streams: int) -> Plan:
    if not 0 < min_bytes <= max_bytes or factor < 2:
        raise typer.BadParameter("need 0 < --min-bytes <= --max-bytes and --step-factor >= 2")
    sizes = []
    size = min_bytes
    while size <= max_bytes:
        sizes.append(size - size % PAYLOAD_DTYPE.itemsize)
        size *= factor
    iters = [min(MAX_ITERS, max(MIN_ITERS, TARGET_BYTES_PER_SIZE // s)) for s in sizes]
    warmup = [max(1, min(10, n // 10)) for n in iters]
    return Plan(sizes, iters, warmup, LATENCY_BYTES, latency_iters, streams)


# ---------------------------------------------------------------------------------------------------
# Running one transport
# ---------------------------------------------------------------------------------------------------


def _worker_command(role: str, transport: str, index: int, senders: int, plan: Plan, offers: str = "") -> list[str]:
    command = [sys.executable, "-m", "benchmarks.transport_links", "--role", role, "--transport", transport]
    command += ["--index", str(index), "--senders", str(senders), "--plan", plan_json(plan)]
    return [*command, "--offers", offers] if offers else command


class _Worker:
    """A worker process and the JSON lines it printed (read on a thread, so pipes never fill)."""

    def __init__(self, command: list[str]) -> None:
        self.name = f"{command[command.index('--role') + 1]} {command[command.index('--index') + 1]}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.records: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._arrived = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._arrived:
                self.records.append(json.loads(line))
                self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def first(self, key: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for record in self.records:
                    if key in record:
                        return record[key]
                if self.process.poll() is not None and not self._readers[0].is_alive():
                    raise BenchError(f"{self.name} exited ({self.process.returncode}): {''.join(self.stderr[-20:])}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name} printed no {key!r} within {timeout}s: {''.join(self.stderr[-20:])}")
                self._arrived.wait(min(left, 0.5))

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"{self.name} did not finish within {timeout}s: {''.join(self.stderr[-20:])}") from None
        for reader in self._readers:
            reader.join(5.0)
        if self.process.returncode != 0:
            raise BenchError(f"{self.name} failed ({self.process.returncode}): {''.join(self.stderr[-20:])}")
        return self.records

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def run_processes(transport: str, plan: Plan, senders: int, receivers: int) -> Measured:
    """Receivers first (they offer the links), then senders with the offers; collect the senders' timings."""
    workers: list[_Worker] = []
    try:
        receiving = [_Worker(_worker_command("receiver", transport, j, senders, plan)) for j in range(receivers)]
        workers += receiving
        offers = [receiver.first("offers", WORKER_TIMEOUT_S) for receiver in receiving]
        sending = [
            _Worker(_worker_command("sender", transport, i, senders, plan, ",".join(o[i] for o in offers)))
            for i in range(senders)
        ]
        workers += sending
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        records = [worker.finish(max(1.0, deadline - time.monotonic())) for worker in sending]
        for receiver in receiving:
            receiver.finish(max(1.0, deadline - time.monotonic()))
    finally:
        for worker in workers:
            worker.stop()
    return _collect(records)


def _collect(per_sender: list[list[dict[str, Any]]]) -> Measured:
    measured = Measured()
    for records in per_sender:
        for record in records:
            if "size" in record:
                per_iter = record["seconds"] / record["iters"]
                measured.seconds[record["size"]] = max(measured.seconds.get(record["size"], 0.0), per_iter)
            elif "one_way_us" in record:
                measured.latency_us = record["one_way_us"]
    return measured


def run_inproc(plan: Plan, senders: int, receivers: int) -> Measured:
    """Sender and receiver threads in this process, handing tensors over queues."""
    pairs = [[inproc_pair() for _ in range(receivers)] for _ in range(senders)]
    records: list[list[dict[str, Any]]] = [[] for _ in range(senders)]
    threads = [
        threading.Thread(target=run_receiver, args=([pairs[i][j][1] for i in range(senders)], plan, j), daemon=True)
        for j in range(receivers)
    ]
    threads += [
        threading.Thread(
            target=run_sender, args=([p[0] for p in pairs[i]], plan, i == 0, records[i].append), daemon=True
        )
        for i in range(senders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WORKER_TIMEOUT_S)
    return _collect(records)


def nccl_unavailable(device: str) -> str | None:
    """Why `--transport nccl` cannot run here with payloads on `device` (one line), or None if it can."""
    if not device.startswith("cuda"):
        return f"nccl moves device memory: pass --device cuda (or cuda:N), not --device {device}"
    from afd.transport.nccl import unavailable_reason  # importing needs neither CUDA nor libnccl

    reason = unavailable_reason()
    if reason is not None:
        return reason
    from afd.transport.nccl.selftest import pair_supported

    return pair_supported()  # two processes on one GPU need NCCL 2.30+


def run_nccl(plan: Plan, senders: int, receivers: int) -> Measured:
    """Sender and receiver processes, each end of every pair an NcclChannel on `plan.device` (both share
    that GPU: two ranks on one GPU need NCCL 2.30+, which `nccl_unavailable` checks)."""
    reason = nccl_unavailable(plan.device)
    if reason is not None:
        raise BenchError(f"the nccl transport is not available: {reason}")
    return run_processes("nccl", plan, senders, receivers)


def _present_device(device: str) -> str:
    """`device` checked to be present here (BenchError naming what was found otherwise)."""
    from afd.devices import parse_device
    from afd.errors import ConfigError

    try:
        return str(parse_device(device))
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


def measure_memcpy(sizes: list[int]) -> dict[int, float]:
    """Seconds per single-threaded copy of each size (numpy copyto: one memcpy, as the shm rings do)."""
    seconds = {}
    for size in sizes:
        source = np.ones(size, dtype=np.uint8)
        target = np.empty_like(source)
        np.copyto(target, source)
        iters = max(MIN_ITERS, min(1000, (256 * 2**20) // size))
        start = time.perf_counter()
        for _ in range(iters):
            np.copyto(target, source)
        seconds[size] = (time.perf_counter() - start) / iters
    return seconds


def run_transport(transport: str, plan: Plan, senders: int, receivers: int) -> Measured:
    if transport == "inproc" and plan.device != "cpu":
        raise BenchError("--transport inproc hands tensors over in memory; --device does not apply to it")
    if transport == "inproc":
        return run_inproc(plan, senders, receivers)
    if transport == "nccl":
        return run_nccl(plan, senders, receivers)
    return run_processes(transport, plan, senders, receivers)


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def build_rows(
    transport: str,
    pattern: str,
    plan: Plan,
    senders: int,
    receivers: int,
    measured: Measured,
    tcp: Measured,
    memcpy: dict[int, float],
) -> list[dict[str, Any]]:
    rows = []
    for size in plan.sizes:
        seconds = measured.seconds[size]
        algbw = receivers * size / seconds / 1e9
        busbw = senders * receivers * size / seconds / 1e9
        tcp_algbw = receivers * size / tcp.seconds[size] / 1e9
        row: dict[str, Any] = {
            "kind": "bandwidth",
            "transport": transport,
            "pattern": pattern,
            "senders": senders,
            "receivers": receivers,
            "size_bytes": size,
            "count": size // PAYLOAD_DTYPE.itemsize,
            "type": "bfloat16",
            "time_us": seconds * 1e6,
            "algbw_gbps": algbw,
            "busbw_gbps": busbw,
            "tcp_algbw_gbps": tcp_algbw,
            "ratio_vs_tcp": algbw / tcp_algbw,
            "memcpy_gbps": size / memcpy[size] / 1e9,
        }
        if transport == "shm":
            row["ratio_vs_memcpy"] = algbw / row["memcpy_gbps"]
        rows.append(row)
    return rows


def latency_row(transport: str, pattern: str, measured: Measured, tcp: Measured) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "latency", "transport": transport, "pattern": pattern, "size_bytes": LATENCY_BYTES}
    for name, samples in ((transport, measured.latency_us), ("tcp", tcp.latency_us)):
        if samples:
            row[f"{name}_p50_us"] = percentile(samples, 50)
            row[f"{name}_p99_us"] = percentile(samples, 99)
    return row


def print_table(console: Console, rows: list[dict[str, Any]], latency: dict[str, Any]) -> None:
    first = rows[0]
    shape = f"{first['senders']} -> {first['receivers']}" if first["pattern"] == "m2n" else "1 -> 1"
    table = Table(title=f"afd bench transport: {first['transport']}, {first['pattern']} ({shape} processes)")
    for column in ("size (B)", "count", "type", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "tcp (GB/s)", "x tcp"):
        table.add_column(column, justify="right")
    shm = "ratio_vs_memcpy" in first
    table.add_column("memcpy (GB/s)", justify="right")
    if shm:
        table.add_column("x memcpy", justify="right")
    for row in rows:
        cells = [
            str(row["size_bytes"]),
            str(row["count"]),
            row["type"],
            f"{row['time_us']:.1f}",
            f"{row['algbw_gbps']:.3f}",
            f"{row['busbw_gbps']:.3f}",
            f"{row['tcp_algbw_gbps']:.3f}",
            f"{row['ratio_vs_tcp']:.2f}",
            f"{row['memcpy_gbps']:.2f}",
        ]
        if shm:
            cells.append(f"{row['ratio_vs_memcpy']:.2f}")
        table.add_row(*cells)
    console.print(table)
    parts = []
    for name in (first["transport"], "tcp"):
        if f"{name}_p50_us" in latency:
            parts.append(f"{name} p50 {latency[f'{name}_p50_us']:.1f} us, p99 {latency[f'{name}_p99_us']:.1f} us")
    if parts:
        console.print(f"one-way latency at {LATENCY_BYTES // 1024} KiB: " + "; ".join(parts))


def command(
    transport: str = typer.Option("shm", help=f"Transport to measure: {', '.join(TRANSPORTS)}."),
    pattern: str = typer.Option("sendrecv", help="sendrecv (1 -> 1) or m2n (--senders -> --receivers)."),
    min_bytes: int = typer.Option(4096, help="Smallest frame payload in bytes."),
    max_bytes: int = typer.Option(64 * 2**20, help="Largest frame payload in bytes."),
    step_factor: int = typer.Option(4, help="Each size is this many times the previous."),
    senders: int = typer.Option(2, help="m2n: sending processes (attention nodes)."),
    receivers: int = typer.Option(2, help="m2n: receiving processes (FFN nodes)."),
    streams: int = typer.Option(1, help="grpc: Exchange streams (connections) per link."),
    latency_iters: int = typer.Option(200, help="Round trips of the 64 KiB latency probe."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    device: str = typer.Option(
        "cpu",
        help="Where payloads live on both ends: cpu, cuda or cuda:N. nccl needs a CUDA device (two processes "
        "on one GPU need NCCL 2.30+); host transports stage device payloads through pinned host memory.",
    ),
) -> None:
    """Bandwidth sweep and 64 KiB latency of a transport, with blocking-TCP and memcpy baselines."""
    if transport not in TRANSPORTS:
        raise typer.BadParameter(f"--transport must be one of {', '.join(TRANSPORTS)}")
    if pattern not in PATTERNS:
        raise typer.BadParameter(f"--pattern must be one of {', '.join(PATTERNS)}")
    if senders < 1 or receivers < 1 or streams < 1:
        raise typer.BadParameter("--senders, --receivers and --streams must be >= 1")
    chosen: Literal["sendrecv", "m2n"] = "m2n" if pattern == "m2n" else "sendrecv"
    senders, receivers = (senders, receivers) if chosen == "m2n" else (1, 1)
    plan = make_plan(min_bytes, max_bytes, step_factor, latency_iters, streams)
    if transport == "nccl" and device == "cpu":
        device = "cuda"  # nccl always moves device memory; `--transport nccl` alone means the first GPU
    plan = dataclasses.replace(plan, device=device)
    # A table narrower than its columns gets truncated; piped output (CI logs, README) gets room too.
    console = Console(stderr=as_json, width=max(Console().width, 150))
    try:
        if transport == "nccl":  # say what is missing at once, before any process is started
            reason = nccl_unavailable(device)
            if reason is not None:
                raise BenchError(f"the nccl transport is not available: {reason}")
        elif device != "cpu":
            plan = dataclasses.replace(plan, device=_present_device(device))
        measured = run_transport(transport, plan, senders, receivers)
        tcp = run_processes("tcp", dataclasses.replace(plan, device="cpu"), senders, receivers)  # host baseline
    except BenchError as exc:
        console.print(f"[red]afd bench transport: {exc}[/red]", soft_wrap=True)  # one line, however long
        raise typer.Exit(1) from None
    memcpy = measure_memcpy(plan.sizes)
    rows = build_rows(transport, chosen, plan, senders, receivers, measured, tcp, memcpy)
    latency = latency_row(transport, chosen, measured, tcp)
    if as_json:
        for row in [*rows, latency]:
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        print_table(console, rows, latency)
