"""One streaming request of `afd bench serve`: send it, time every token chunk, never raise.

Server-sent events are read line by line; a chunk with generated text is a token arrival (TTFT for the
first, ITL after), the usage chunk (`stream_options.include_usage`) gives the exact token counts, and
`data: [DONE]` ends a successful stream. An HTTP error, an error event, a torn connection or a stream
without [DONE] makes the request failed with the reason in `error`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from benchmarks.serve_dataset import SampleRequest
from benchmarks.serve_metrics import RequestOutput


def token_text(chunk: Mapping[str, Any], chat: bool) -> str | None:
    """The text of a chunk that carries a generated token, None for bookkeeping chunks.

    Chat streams open with a role-only chunk (no content) that must not count as the first token.
    Completion chunks count even with empty text (a special token detokenizes to ""), except the
    empty one that only carries finish_reason.
    """
    choices = chunk.get("choices") or []
    if not choices:
        return None  # the usage-only chunk
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
        return text or None
    text = choice.get("text") or ""
    return text if text or choice.get("finish_reason") is None else None


async def send_streaming_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], planned: SampleRequest, chat: bool, origin: float
) -> RequestOutput:
    """Send one streaming request and time its chunks; every failure ends up in `error`, never raised."""
    output = RequestOutput(prompt_len=planned.prompt_len)
    sent = time.perf_counter()
    output.start_time = sent - origin
    try:
        await _stream_into(output, client, url, payload, planned, chat, sent)
    except Exception as error:  # whatever breaks one request (HTTP, a torn stream, bad JSON) fails only that one
        output.success = False
        output.error = f"{type(error).__name__}: {error}"
    return output


async def _stream_into(
    output: RequestOutput,
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    planned: SampleRequest,
    chat: bool,
    sent: float,
) -> None:
    texts: list[str] = []
    usage: dict[str, Any] = {}
    last, finished = sent, False
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            output.error = f"HTTP {response.status_code}: {body[:500]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                output.error = f"error in stream: {json.dumps(chunk['error'])[:500]}"
                return
            now = time.perf_counter()
            text = token_text(chunk, chat)
            if text is not None:
                if texts:
                    output.itl.append(now - last)
                else:
                    output.ttft = now - sent
                last = now
                texts.append(text)
            usage = chunk.get("usage") or usage
    if not finished:
        output.error = "stream ended before data: [DONE]"
    elif not texts:
        output.error = "stream had no generated tokens"
    else:
        output.latency = last - sent
        output.generated_text = "".join(texts)
        output.output_tokens = int(usage.get("completion_tokens") or len(texts))
        output.prompt_len = int(usage.get("prompt_tokens") or planned.prompt_len)
        output.success = True
