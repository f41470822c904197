"""Where one layer's attention -> FFN -> attention exchange spends its time, hop by hop, across processes.

With `AFD_EXCHANGE_TRACE=DIR` in its environment, a node process (`afd node attn|ffn`, so every process
`afd up` starts) wraps the entry points of the exchange path in place, as benchmarks/step_split.py does for
kernels, and appends one line per event to `DIR/trace-<pid>.txt`: the monotonic clock (perf_counter, the
same clock in every process of a host), the event, a key (the frame's sequence number or the layer), and
the thread's CPU clock. Without the variable nothing is wrapped and nothing costs anything.

`afd bench cluster --trace-exchanges DIR` runs its clusters with it, and benchmarks/exchange_trace.py matches
the events by sequence number into the hops of each exchange (it says which). Channel transports only (shm,
gloo, NCCL): the gRPC door has no per-frame thread of its own to time.

Why wrapping rather than marks in the hot path: the path stays as it is when nobody traces, and the trace
can follow the functions as they move between modules (only this file changes).
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "AFD_EXCHANGE_TRACE"
"""Directory the node processes write their traces to; unset: no tracing."""
FLUSH_EVERY = 256
"""Events kept in memory before they are appended to the file (a node stopped by a signal loses at most these)."""


class _Recorder:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"trace-{os.getpid()}.txt"
        self.events: list[tuple[float, str, int, float]] = []
        self.lock = threading.Lock()

    def mark(self, name: str, key: int = 0) -> None:
        self.events.append((time.perf_counter(), name, key, time.thread_time()))
        if len(self.events) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            events, self.events = self.events, []
            if events:
                with self.path.open("a") as out:
                    out.write("".join(f"{t:.6f} {name} {key} {cpu:.6f}\n" for t, name, key, cpu in events))


_recorder: _Recorder | None = None


def _around(owner: Any, attribute: str, before: str, after: str, key: Callable[..., int]) -> None:
    """Wrap `owner.attribute` so that it marks `before` and `after` (each with `key(args, result)`)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def traced(*args: Any, **kwargs: Any) -> Any:
        recorder = _recorder
        assert recorder is not None
        if before:
            recorder.mark(before, key(args, None))
        result = original(*args, **kwargs)
        if after:
            recorder.mark(after, key(args, result))
        return result

    setattr(owner, attribute, traced)


def install(directory: Path) -> None:
    """Start tracing this process into `directory` (idempotent)."""
    global _recorder
    if _recorder is not None:
        return
    _recorder = _Recorder(directory)
    atexit.register(_recorder.flush)

    import afd.transport.channel_transport as channel_transport
    import attn_nodes.runner as runner
    import ffn_nodes.answers as answers
    import ffn_nodes.batching as batching
    import ffn_nodes.channel_server as channel_server

    # attention node: the layer's attention half starts, its requests are sent (seq), the reply is read
    # (seq), the combine waits and ends (layer)
    _around(runner.ModelRunner, "_dispatch", "attn_half", "", lambda args, result: args[1])
    _around(channel_transport.ChannelTransport, "_send", "send", "sent", lambda args, r: r[0] if r else 0)
    _around(channel_transport._Link, "_on_reply", "reply_read", "", lambda args, result: args[1].seq)
    _around(runner.ModelRunner, "_combine", "combine", "combined", lambda args, result: args[1])
    # FFN node: a frame is read (seq), computed (batch), its reply encoded (seq) and sent
    _around(channel_server, "answer_threadsafe", "frame_read", "", lambda args, result: args[2].seq)
    _around(batching.Batcher, "_timed_compute", "compute", "computed", lambda args, result: len(args[2]))
    _around(answers, "encode_response", "", "encoded", lambda args, result: args[3])


def install_from_env() -> None:
    """`install` into $AFD_EXCHANGE_TRACE when it is set (node process start-up)."""
    directory = os.environ.get(ENV)
    if directory:
        install(Path(directory))
