"""SamplingParams and TokenLogprobs <-> their protobuf forms (afd.v1.SamplingParams, afd.v1.TokenLogprobs).

One place for both directions, so the router (which sends a request's parameters and reads the logprobs
back) and the attention node (which reads the parameters and sends the logprobs) cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from afd.sampling_params import SamplingParams, TokenLogprobs
from afd.wire.generated import afd_cluster_pb2 as pb


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=None if params.repetition_penalty == 1.0 else params.repetition_penalty,
        min_tokens=params.min_tokens,
        logit_bias=dict(params.logit_bias),
    )


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Raises RequestError (from SamplingParams) for values out of range."""
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        min_tokens=p.min_tokens,
        logit_bias=tuple(sorted(p.logit_bias.items())),
    )


def logprobs_to_proto(entries: Iterable[TokenLogprobs]) -> list[pb.TokenLogprobs]:
    return [
        pb.TokenLogprobs(
            token_id=e.token_id,
            logprob=e.logprob,
            rank=e.rank,
            top_token_ids=[t for t, _ in e.top],
            top_logprobs=[v for _, v in e.top],
        )
        for e in entries
    ]


def logprobs_from_proto(messages: Iterable[pb.TokenLogprobs]) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(m.token_id, m.logprob, m.rank, tuple(zip(m.top_token_ids, m.top_logprobs, strict=True)))
        for m in messages
    ]
