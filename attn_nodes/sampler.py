"""Token sampling: greedy, temperature, top-k, top-p and per-request seeds, batched over requests; the logits
processors (min_tokens, logit_bias, repetition / frequency / presence penalties) and log-probabilities.

The order is vLLM's (v1/sample/sampler.py): raw log-probabilities of the model's logits first (vLLM's default
logprobs_mode, raw_logprobs: what is returned does not depend on penalties or temperature), then min_tokens
and logit_bias, then the penalties, then temperature, top-k / top-p and the draw. A batch where no request
asks for logprobs or penalties takes the plain path: no log-softmax over the vocabulary, no copy of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from afd.kernels import greedy_tokens
from afd.sampling_params import SamplingParams, TokenLogprobs

__all__ = ["SampleResult", "Sampler", "SamplingRow", "TokenLogprobs", "gather_logprobs"]


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs of one request for one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None = None
    """The request's generator for this position (seeded requests); the sampler's own when None."""
    prompt_token_ids: Sequence[int] = ()
    """Read only when the request has a repetition penalty."""
    output_token_ids: Sequence[int] = field(default_factory=list)
    """Tokens generated so far (penalties, min_tokens)."""


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    """Per row: None unless the row's request asked for logprobs."""


class Sampler:
    """Samples one token per row of logits; rows without a seed share the sampler's generator."""

    def __init__(self, seed: int = 0, eos_token_ids: Sequence[int] = (), device: torch.device | str = "cpu") -> None:
        """`device`: where the logits are (the model's device); the draws happen there, with generators there."""
        self.device = torch.device(device)
        # meta has no generator; its logits are never drawn from (tests of the device path only run greedy)
        self.generator = torch.Generator(device="cpu" if self.device.type == "meta" else self.device)
        self.generator.manual_seed(seed)
        self.eos_token_ids = tuple(eos_token_ids)
        """The model's end-of-sequence tokens, which min_tokens keeps from being sampled (unless ignore_eos)."""

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """logits: `[num_rows, vocab] float32`; one SamplingParams and optional generator per row."""
        rows = [SamplingRow(p, g) for p, g in zip(params, generators, strict=True)]
        return self.sample_rows(logits, rows).token_ids

    def sample_rows(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """logits: `[num_rows, vocab] float32`, one SamplingRow per row; the caller's tensor is not changed."""
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None
        processed = [i for i, r in enumerate(rows) if r.params.penalized]
        if processed:
            index = torch.tensor(processed, device=logits.device)
            changed = self._process(logits[index], [rows[i] for i in processed])
            logits = logits.index_copy(0, index, changed)
        params = [r.params for r in rows]
        tokens = greedy_tokens(logits)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            probs = self._probabilities(logits[index], [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                generator = rows[i].generator or self.generator
                tokens[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
        token_ids = read_token_ids(tokens)
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            chosen = [token_ids[i] for i in want_logprobs]
            ks = [params[i].logprobs or 0 for i in want_logprobs]
            for i, entry in zip(want_logprobs, gather_logprobs(raw_logprobs, chosen, ks), strict=True):
                out[i] = entry
        return SampleResult(token_ids, out)

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """min_tokens, logit_bias, then repetition / frequency / presence penalties, in vLLM's order.

        logits: `[rows, vocab] float32`, a copy this function may change.
        """
        vocab = logits.shape[1]
        device = logits.device
        for j, row in enumerate(rows):
            p = row.params
            if p.min_tokens and len(row.output_token_ids) < p.min_tokens:
                # vLLM's MinTokensLogitsProcessor: every token that would stop the request (its stop_token_ids,
                # and EOS unless ignore_eos) is impossible until min_tokens are out.
                banned = {t for t in p.stop_token_ids if t < vocab}
                if not p.ignore_eos:
                    banned.update(t for t in self.eos_token_ids if t < vocab)
                if banned:
                    logits[j, torch.tensor(sorted(banned), device=device)] = float("-inf")
            if p.logit_bias:
                ids = torch.tensor([t for t, _ in p.logit_bias if t < vocab], dtype=torch.int64, device=device)
                bias = torch.tensor([b for t, b in p.logit_bias if t < vocab], dtype=logits.dtype, device=device)
                logits[j].index_add_(0, ids, bias)
            if p.repetition_penalty != 1.0:
                # HF / vLLM: over prompt and output tokens, divide positive logits and multiply negative ones.
                seen = torch.tensor([*row.prompt_token_ids, *row.output_token_ids], dtype=torch.int64, device=device)
                mask = torch.zeros(vocab, dtype=torch.bool, device=device)
                mask[seen[seen < vocab]] = True
                line = logits[j]
                penalised = torch.where(line > 0, line / p.repetition_penalty, line * p.repetition_penalty)
                logits[j] = torch.where(mask, penalised, line)
            if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
                # OpenAI: logit -= frequency_penalty * count + presence_penalty * (count > 0), output tokens only.
                output = torch.tensor(list(row.output_token_ids), dtype=torch.int64, device=device)
                counts = torch.bincount(output[output < vocab], minlength=vocab).to(logits.dtype)
                logits[j] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of temperature-scaled logits with top-k / top-p filtering, `[rows, vocab] float32`."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits = logits / temperature.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        top_p = [p.top_p for p in params]
        if max(top_p) < 1.0 or min(top_k) < logits.shape[1]:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            rank = torch.arange(logits.shape[1], device=device).unsqueeze(0)
            drop = rank >= torch.tensor(top_k, device=device).unsqueeze(1)
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
            drop |= (probs.cumsum(dim=-1) - probs) >= torch.tensor(top_p, device=device).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits.softmax(dim=-1)


def read_token_ids(tokens: torch.Tensor) -> list[int]:
    """`tokens: [rows] int64` sampled ids on the model's device -> host ints: the decode step's one read back
    to the host (the scheduler needs the ids). Everything else of a step stays on the device."""
    return tokens.tolist()


def gather_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int], ks: Sequence[int]) -> list[TokenLogprobs]:
    """Per row of `logprobs` (`[rows, vocab] float32`, log-softmax already taken): the logprob and rank of
    `token_ids[row]` and the `ks[row]` most likely tokens. One readback for the whole batch."""
    index = torch.tensor(list(token_ids), dtype=torch.int64, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index)
    ranks = (logprobs > chosen).sum(dim=1) + 1
    k = max(ks, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen_list, rank_list = chosen.squeeze(1).tolist(), ranks.tolist()
    values, ids = top_values.tolist(), top_ids.tolist()
    out = []
    for r, t in enumerate(token_ids):
        top = tuple(zip(ids[r][: ks[r]], values[r][: ks[r]], strict=True))
        out.append(TokenLogprobs(int(t), float(chosen_list[r]), int(rank_list[r]), top))
    return out
