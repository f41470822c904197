"""The attention node's engine: requests in, tokens out, one `step()` at a time.

Each step schedules (continuous batching over the paged KV cache), runs the model with the FFN pool
behind the transport, samples, and reports new tokens. `generate` is the offline convenience loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from afd.checkpoint import CheckpointReader
from afd.devices import parse_device
from afd.dtypes import resolve_dtype
from afd.errors import ConfigError, RequestError
from afd.host_memory import retain_freed_memory
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.sampling_params import SamplingParams
from afd.transport.base import FfnTransport
from attn_nodes.attention_metadata import SequenceChunk
from attn_nodes.config import EngineConfig
from attn_nodes.dispatch import FfnDispatcher
from attn_nodes.kv_cache import KVCacheManager, allocate_cache_tensors, blocks_for_budget
from attn_nodes.linear_attention import LinearStateStore
from attn_nodes.model import AttentionHalfModel
from attn_nodes.request import Request, RequestOutput
from attn_nodes.runner import Microbatch, ModelRunner, resolve_wire_dtype
from attn_nodes.sampler import Sampler, SamplingRow, TokenLogprobs, gather_logprobs
from attn_nodes.scheduler import ScheduledChunk, Scheduler


class AttentionEngine:
    def __init__(
        self,
        model: AttentionHalfModel,
        transport: FfnTransport,
        placement: ExpertPlacement | None,
        config: EngineConfig | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.spec = model.spec
        self.max_model_len = max_model_len or model.rope.max_positions
        width = self.spec.kv_entry_width
        cfg = self.config
        # Lightning-attention layers (MiniMax) keep a state per request instead of a paged cache: the states of
        # max_num_seqs requests come out of the cache budget first, and only the other layers get KV tensors.
        paged = [layer for layer in range(self.spec.num_layers) if not self.spec.is_linear_attention(layer)]
        state_gib = cfg.max_num_seqs * LinearStateStore.bytes_per_slot(self.spec, model.dtype) / 2**30
        if state_gib and cfg.num_kv_blocks is None and state_gib >= cfg.kv_cache_gib:
            raise ConfigError(
                f"the linear-attention states of max_num_seqs={cfg.max_num_seqs} requests need {state_gib:.3f} GiB, "
                f"kv_cache_gib={cfg.kv_cache_gib} leaves nothing for the KV cache; raise it or lower max_num_seqs"
            )
        num_blocks = cfg.num_kv_blocks or blocks_for_budget(
            cfg.kv_cache_gib - state_gib, max(1, len(paged)), cfg.block_size, width, model.dtype
        )
        device = model.device
        states = LinearStateStore(self.spec, cfg.max_num_seqs, model.dtype, device) if state_gib else None
        self.kv = KVCacheManager(num_blocks, cfg.block_size, states)
        tensors = iter(allocate_cache_tensors(len(paged), num_blocks, cfg.block_size, width, model.dtype, device))
        cache = [
            states.layer(layer) if states is not None and layer not in paged else next(tensors)
            for layer in range(self.spec.num_layers)
        ]
        self.dispatcher = FfnDispatcher(self.spec, placement, compact_rows=transport.rows_cross_a_wire)
        wire = resolve_wire_dtype(cfg.wire_dtype)
        self.runner = ModelRunner(model, cache, cfg.block_size, transport, self.dispatcher, wire)
        self.scheduler = Scheduler(cfg, self.kv)
        self.sampler = Sampler(cfg.seed, self.spec.eos_token_ids, device)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._microbatches = cfg.microbatches

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        transport: FfnTransport,
        placement: ExpertPlacement | None,
        config: EngineConfig | None = None,
        reader: CheckpointReader | None = None,
    ) -> AttentionEngine:
        config = config or EngineConfig()
        spec = ModelSpec.from_pretrained(model_dir)
        max_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        dtype = resolve_dtype(config.dtype, spec.dtype)
        device = parse_device(config.device)
        model = AttentionHalfModel.load(model_dir, max_len, dtype=dtype, spec=spec, reader=reader, device=device)
        engine = cls(model, transport, placement, config, max_len)
        retain_freed_memory(device)  # after the weights and the KV cache are allocated (afd.host_memory says why)
        return engine

    @property
    def placement(self) -> ExpertPlacement | None:
        return self.dispatcher.placement

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Address FFN nodes by a new placement (call between steps)."""
        self.dispatcher.set_placement(placement)

    @property
    def microbatches(self) -> int:
        return self._microbatches

    @microbatches.setter
    def microbatches(self, value: int) -> None:
        self._microbatches = max(1, int(value))

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        resume_output_token_ids: Sequence[int] = (),
    ) -> str:
        """Queue a request; raises RequestError for input that can never be served.

        `resume_output_token_ids` are tokens another node already generated for this request (migration):
        they are re-prefilled with the prompt and count towards max_tokens.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        resumed = [int(t) for t in resume_output_token_ids]
        if not prompt:
            raise RequestError("prompt must contain at least one token")
        if len(resumed) >= params.max_tokens:
            raise RequestError(f"{len(resumed)} resumed tokens already reach max_tokens={params.max_tokens}")
        bad = [t for t in prompt + resumed if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        bad = [t for t, _ in params.logit_bias if t >= self.spec.vocab_size]
        if bad:
            raise RequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})")
        if len(prompt) + len(resumed) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt) + len(resumed)} tokens; the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        longest = min(len(prompt) + params.max_tokens, self.max_model_len)
        if self.kv.blocks_for(longest) > self.kv.num_blocks:
            raise RequestError(
                f"request needs {self.kv.blocks_for(longest)} KV blocks, the cache has {self.kv.num_blocks}"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt, params, output_token_ids=resumed)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.finished:
            self.scheduler.finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        groups = _split(scheduled, self._microbatches)
        prepared = [self._prepare(group) for group in groups]
        states = self.kv.states
        # Lightning-attention states change in place (the KV writes are idempotent, these are not): a step that
        # fails midway (an FFN node died; the engine thread runs it again) puts them back first.
        saved = states.snapshot([self.kv.state_slot(c.request.request_id) for c in scheduled]) if states else None
        try:
            logits = self.runner.forward([mb for mb, _ in prepared])
        except BaseException:
            if states is not None and saved is not None:
                states.restore(saved)
            raise
        outputs = []
        for group, (_, scored), group_logits in zip(groups, prepared, logits, strict=True):
            sampling = [chunk for chunk in group if chunk.completes_sequence]
            if scored:
                self._score_prompts(scored, group_logits[len(sampling) :])
            result = (
                self.sampler.sample_rows(
                    group_logits[: len(sampling)] if scored else group_logits,
                    [
                        SamplingRow(
                            c.request.params,
                            c.request.next_token_generator(self.sampler.device),
                            c.request.prompt_token_ids,
                            c.request.output_token_ids,
                        )
                        for c in sampling
                    ],
                )
                if sampling
                else None
            )
            sampled = {
                id(c): (token, lp)
                for c, token, lp in zip(
                    sampling, result.token_ids if result else [], result.logprobs if result else [], strict=True
                )
            }
            for chunk in group:
                chunk.request.num_computed_tokens += chunk.num_tokens
                if id(chunk) in sampled:
                    outputs.append(self._append(chunk.request, *sampled[id(chunk)]))
        return outputs

    def _prepare(self, group: list[ScheduledChunk]) -> tuple[Microbatch, list[_PromptRows]]:
        """The microbatch of `group`, with extra logits rows for prompt logprobs after the sampled rows.

        The runner returns logits for the rows of `logits_rows`, in order: the last token of each chunk that
        completes its sequence (sampling), then here the prompt positions whose next-token logprobs a
        prompt_logprobs request still needs. Requests that ask for none add no rows: the step is unchanged.
        """
        chunks, tokens, wants = [], [], []
        scored: list[_PromptRows] = []
        extra_rows: list[int] = []
        start = 0  # flat row of this chunk's first token: the runner concatenates the chunks' tokens in order
        for c in group:
            r = c.request
            chunks.append(
                SequenceChunk(
                    self.kv.block_ids(r.request_id),
                    r.num_computed_tokens,
                    c.num_tokens,
                    self.kv.state_slot(r.request_id),
                )
            )
            tokens.append(r.token_ids(r.num_computed_tokens, r.num_computed_tokens + c.num_tokens))
            wants.append(c.completes_sequence)
            if r.params.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1; positions scored before a preemption are skipped.
                first = max(r.num_computed_tokens, len(r.prompt_logprobs))
                last = min(r.num_computed_tokens + c.num_tokens, len(r.prompt_token_ids) - 1)
                if first < last:
                    scored.append(_PromptRows(r, first, last))
                    extra_rows.extend(start + p - r.num_computed_tokens for p in range(first, last))
            start += c.num_tokens
        return self.runner.prepare(chunks, tokens, wants, extra_rows), scored

    @staticmethod
    def _score_prompts(scored: list[_PromptRows], logits: torch.Tensor) -> None:
        """logits: `[sum of scored positions, vocab] float32`, in the order of `scored`."""
        logprobs = logits.log_softmax(dim=-1)
        offset = 0
        for item in scored:
            r, count = item.request, item.last - item.first
            targets = r.prompt_token_ids[item.first + 1 : item.last + 1]
            k = r.params.prompt_logprobs or 0
            r.prompt_logprobs.extend(gather_logprobs(logprobs[offset : offset + count], targets, [k] * count))
            offset += count

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        request.output_token_ids.append(token)
        params = request.params
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.spec.eos_token_ids):
            reason = "stop"
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(request, reason)
            del self.requests[request.request_id]
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            request.prompt_logprobs_sent = True
            prompt_logprobs = list(request.prompt_logprobs)
        return RequestOutput(
            request.request_id,
            [token],
            reason is not None,
            reason,
            len(request.prompt_token_ids),
            len(request.output_token_ids),
            logprobs=[logprobs] if logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
        )

    # ---- offline convenience --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion; returns the generated token ids per prompt, in order."""
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]


@dataclass(frozen=True, slots=True)
class _PromptRows:
    """Prompt positions [first, last) of one request scored in this step (prompt_logprobs)."""

    request: Request
    first: int
    last: int


def _split(scheduled: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """Split into at most `parts` groups of consecutive requests with similar token counts."""
    parts = max(1, min(parts, len(scheduled)))
    if parts == 1:
        return [scheduled]
    total = sum(c.num_tokens for c in scheduled)
    groups: list[list[ScheduledChunk]] = [[]]
    acc = 0
    for index, chunk in enumerate(scheduled):
        remaining_items = len(scheduled) - index
        remaining_groups = parts - len(groups)
        if groups[-1] and (acc >= total * len(groups) / parts or remaining_items <= remaining_groups):
            groups.append([])
        groups[-1].append(chunk)
        acc += chunk.num_tokens
    return groups
