"""Token sampling: greedy, temperature, top-k, top-p and per-request seeds, batched over requests."""

from __future__ import annotations

import torch

from afd.sampling_params import SamplingParams


class Sampler:
    """Samples one token per row of logits; rows without a seed share the sampler's generator."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """logits: `[num_rows, vocab] float32`; one SamplingParams and optional generator per row."""
        tokens = logits.max(dim=-1).indices  # 3x faster than argmax on CPU, same first-max index
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows)
            probs = self._probabilities(logits[rows], [params[i] for i in random_rows])
            for j, i in enumerate(random_rows):
                generator = generators[i] or self.generator
                tokens[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
        return tokens.tolist()

    @staticmethod
    def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of temperature-scaled logits with top-k / top-p filtering, `[rows, vocab] float32`."""
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        logits = logits / temperature.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        top_p = [p.top_p for p in params]
        if max(top_p) < 1.0 or min(top_k) < logits.shape[1]:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            rank = torch.arange(logits.shape[1]).unsqueeze(0)
            drop = rank >= torch.tensor(top_k).unsqueeze(1)
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
            drop |= (probs.cumsum(dim=-1) - probs) >= torch.tensor(top_p).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits.softmax(dim=-1)
