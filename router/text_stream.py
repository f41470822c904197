"""Incremental detokenization of one request, with OpenAI `stop` strings.

Text that could be the start of a stop string is held back until the next tokens decide it, so a stop
string never leaks into the output, even when it spans several tokens (unless include_stop_str_in_output,
as in vLLM, keeps the matched string).
"""

from __future__ import annotations

from afd.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop_strings: list[str], include_stop: bool = False) -> None:
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self._stops = stop_strings
        self._include_stop = include_stop
        self._hold = max((len(s) for s in stop_strings), default=1) - 1
        self._pending = ""
        self.text = ""
        """Everything emitted so far."""
        self.stopped = False
        """A stop string matched; the caller should abort the request."""

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that is now safe to emit."""
        if self._decoder is None or self.stopped:
            return ""
        for token in token_ids:
            self._pending += self._decoder.step(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release what was held back."""
        return "" if self.stopped else self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stops:
            found = [(i, len(s)) for i, s in ((self._pending.find(s), s) for s in self._stops) if i >= 0]
            if found:
                start, length = min(found)
                cut = start + length if self._include_stop else start
                self.stopped = True
                out, self._pending = self._pending[:cut], ""
                self.text += out
                return out
        keep = 0 if final or not self._stops else self._hold
        out = self._pending[: len(self._pending) - keep] if keep else self._pending
        self._pending = self._pending[len(out) :]
        self.text += out
        return out
