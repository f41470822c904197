"""The engine thread of an attention node: the one thread that runs and changes the engine.

Invariant: the engine is touched only by this thread. Requests, aborts, placement changes and microbatch
plans reach it as commands through an inbox and are applied between steps, so every step runs under one
placement from its first layer to its last. When an FFN node fails mid-step, the step raises PeerError;
the thread reports the peer (through the callback its owner gives it), keeps applying its inbox until a
placement without that peer arrives, and runs the step again - the KV cache writes of a step are
idempotent, so re-running it is safe. Results go to each request's OutputStream on the owner's event loop.

Commands are small frozen dataclasses named by what they ask (vLLM's engine-core requests are shaped the
same way), not string-tagged tuples.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from afd.errors import PeerError, RequestError
from afd.placement import ExpertPlacement
from afd.sampling_params import SamplingParams
from afd.transport.base import FfnTransport
from afd.transport.deadlines import Withdrawn
from attn_nodes.engine import AttentionEngine
from attn_nodes.request import RequestOutput

log = logging.getLogger("afd.attention")


@dataclass(slots=True)
class OutputStream:
    """Where one request's outputs go: a queue on the event loop that serves its Generate call."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        """Thread-safe: hand an output (or the request's failure) to the event loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    resume: list[int]
    """Tokens another attention node already generated for it (migration); re-prefilled with the prompt."""


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class ApplyPlacement:
    placement: ExpertPlacement
    addresses: dict[str, str]
    """FFN node id -> host:port, for transports that connect by address."""
    done: concurrent.futures.Future[int]
    """Set to the placement's version once applied (or to the reason it could not be)."""


@dataclass(frozen=True, slots=True)
class SetMicrobatches:
    count: int


EngineCommand = AddRequest | AbortRequest | ApplyPlacement | SetMicrobatches

RecoveryPlacement = tuple[ExpertPlacement, dict[str, str]] | None
ReportFailure = Callable[[PeerError], concurrent.futures.Future[RecoveryPlacement]]
"""Tells the router a peer failed; resolves to the router's placement without it (None if it has none)."""


class EngineThread:
    """Runs `engine` on a thread of its own; every other thread talks to it through commands."""

    def __init__(
        self,
        engine: AttentionEngine,
        transport: FfnTransport,
        node_id: str,
        recovery_timeout_s: float,
        report_failure: ReportFailure,
    ) -> None:
        """recovery_timeout_s: longest wait for a placement without a failed FFN node before the requests of
        the failed step fail."""
        self.engine = engine
        self.transport = transport
        self.node_id = node_id
        self.recovery_timeout_s = recovery_timeout_s
        self.report_failure = report_failure
        self.streams: dict[str, OutputStream] = {}
        """Requests this node serves -> where their outputs go (event loop side of the bookkeeping)."""
        self.generated = 0
        """Tokens generated since start (monotonic; heartbeats report it)."""
        self._inbox: queue.SimpleQueue[EngineCommand] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the owner's side (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.node_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; idempotent."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams, resume: list[int], stream: OutputStream
    ) -> None:
        self.streams[request_id] = stream
        self._send(AddRequest(request_id, prompt, params, resume))

    def abort(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is not None:
            self._send(AbortRequest(request_id))

    def offer_placement(self, placement: ExpertPlacement, addresses: dict[str, str]) -> concurrent.futures.Future[int]:
        """Queue a placement for the next step boundary; the future is its version once applied."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        current = self.engine.placement
        if current is not None and placement.version <= current.version:
            done.set_result(current.version)
        else:
            self._send(ApplyPlacement(placement, addresses, done))
        return done

    def set_microbatches(self, count: int) -> None:
        self._send(SetMicrobatches(count))

    def _send(self, command: EngineCommand) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._apply_inbox()
            if engine.placement is None or not engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except PeerError as exc:
                self._recover(exc)
                continue
            except Exception as exc:  # a bug must not leave clients hanging: fail this batch's requests
                log.exception("engine step failed")
                for request_id in list(engine.requests):
                    self._fail(request_id, exc)
                continue
            for output in outputs:
                self._deliver(output)

    def _apply_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            match command:
                case AddRequest(request_id, prompt, params, resume):
                    if request_id not in self.streams:
                        continue  # aborted before it started
                    try:
                        self.engine.add_request(prompt, params, request_id, resume)
                    except RequestError as exc:
                        self._fail(request_id, exc)
                case AbortRequest(request_id):
                    self.engine.abort(request_id)
                case ApplyPlacement(placement, addresses, done):
                    try:
                        self._switch(placement, addresses)
                    except Exception as exc:  # e.g. a channel that cannot be opened: say so, keep serving
                        log.exception("placement v%d could not be applied", placement.version)
                        done.set_exception(exc)
                    else:
                        done.set_result(placement.version)
                case SetMicrobatches(count):
                    self.engine.microbatches = count

    def _switch(self, placement: ExpertPlacement, addresses: dict[str, str]) -> None:
        engine = self.engine
        current = engine.placement
        if current is not None and placement.version <= current.version:
            return
        self.transport.set_peers({node: addresses[node] for node in placement.nodes})
        engine.set_placement(placement)
        watch = getattr(self.transport, "watch", None)
        if watch is not None:  # a node withdrawn as a straggler is judged afresh when it comes back
            watch.placement_changed(placement.nodes)
        log.info("attention node %s now on placement v%d", self.node_id, placement.version)

    def _recover(self, error: PeerError) -> None:
        """Report a failed FFN node and wait (applying the inbox) for a placement that avoids it."""
        engine = self.engine
        failed_version = engine.placement.version if engine.placement else -1
        reply: concurrent.futures.Future[RecoveryPlacement]
        if isinstance(error, Withdrawn):
            # The router withdrew a straggler and its new placement is queued already: nothing to report.
            log.info("step re-runs without straggler %s: %s", error.peer, error)
            reply = concurrent.futures.Future()
            reply.set_result(None)
        else:
            log.warning("step failed on FFN node %s: %s; asking the router for a new placement", error.peer, error)
            reply = self.report_failure(error)
        deadline = time.monotonic() + self.recovery_timeout_s
        while time.monotonic() < deadline and not self._stopping:
            self._apply_inbox()
            placement = engine.placement
            if placement is not None and placement.version > failed_version:
                return
            if reply.done() and reply.exception() is None and (offered := reply.result()) is not None:
                new, addresses = offered
                if new.version > failed_version:
                    try:
                        self._switch(new, addresses)
                        return
                    except Exception:  # keep waiting: the next placement may be usable
                        log.exception("the router's placement after the failure could not be applied")
                        reply = concurrent.futures.Future()
            self._wake.wait(0.05)
            self._wake.clear()
        for request_id in list(engine.requests):
            self._fail(
                request_id, PeerError(error.peer, f"no placement without it after {self.recovery_timeout_s:.0f} s")
            )

    def _deliver(self, output: RequestOutput) -> None:
        self.generated += len(output.new_token_ids)
        stream = self.streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            self.streams.pop(output.request_id, None)
        stream.put(output)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self.engine.abort(request_id)
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)
