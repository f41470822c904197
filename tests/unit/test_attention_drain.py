"""Drain of an attention node: DrainRequest.deadline_seconds bounds how long running requests may take."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from afd.errors import PeerError
from afd.wire.generated import afd_cluster_pb2 as pb
from attn_nodes.engine_thread import EngineThread, OutputStream
from attn_nodes.server import AttentionNodeConfig, AttentionNodeServer, _AttentionServicer


def test_drain_hands_back_requests_still_running_at_the_requested_deadline():
    async def drain() -> tuple[float, object, int]:
        # No engine, transport or router needed: drain only waits for the streams, hands them back and stops
        # (the engine thread is never started; it only queues the abort).
        node = AttentionNodeServer(AttentionNodeConfig(Path("unused"), "127.0.0.1:1", "attn-0", drain_timeout_s=60))
        node.engine_thread = EngineThread(None, None, "attn-0", 1.0, lambda error: None)  # type: ignore[arg-type]
        stream = OutputStream(asyncio.get_running_loop(), asyncio.Queue())
        node.engine_thread.streams["never-finishes"] = stream
        started = time.monotonic()
        reply = await _AttentionServicer(node).Drain(pb.DrainRequest(deadline_seconds=0.3), None)
        await asyncio.wait_for(node.serve(), 10)  # returns once drain_and_stop asked the node to stop
        return time.monotonic() - started, await stream.queue.get(), reply.num_unfinished

    elapsed, handed_back, unfinished = asyncio.run(drain())
    assert unfinished == 1
    assert 0.25 < elapsed < 5.0, f"drain took {elapsed:.1f} s; asked for 0.3 s (configured: 60 s)"
    assert isinstance(handed_back, PeerError) and "migrates the request" in str(handed_back)
