"""Fuzzing the frame decoder: random and mutated frames raise only FrameError subclasses, quickly.

Two generators: a seeded mutator (>= 10,000 frames: bit flips, truncations, random bytes, and
structure-aware edits of header fields and tensor descriptors with payloads resized to match, so the
deeper checks are reached), and hypothesis (arbitrary msgpack headers and byte strings).
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afd.ffn_messages import FfnRequest, quantize_fp8
from afd.wire import frames
from afd.wire.frames import (
    FrameError,
    FrameKind,
    FrameLimits,
    encode_error,
    encode_request,
    encode_response,
    pack,
    partial_from_frame,
    request_from_frame,
    unpack,
)

HIDDEN = 16
LIMITS = FrameLimits(hidden_size=HIDDEN, num_layers=3, top_k=2, max_local_experts=4, max_tokens=32)
SLOW_CALL_SECONDS = 0.5
"""A single decode taking this long counts as a hang."""


def decode_fully(buffer: bytes | bytearray) -> FrameKind:
    """unpack plus the typed accessors, as a server or client would use them."""
    header, tensors = unpack(buffer, LIMITS)
    for spec, tensor in zip(header.tensor_specs(), tensors, strict=True):
        assert (tuple(tensor.shape), tensor.dtype) == (spec.shape, spec.dtype)
    if header.kind is FrameKind.FFN_REQUEST:
        request = request_from_frame(header, tensors)
        if request.expert_ids is not None and request.expert_ids.numel():
            assert int(request.expert_ids.min()) >= -1 and int(request.expert_ids.max()) < LIMITS.max_local_experts
        if request.hidden_scale is not None:
            assert request.hidden.dtype == torch.float8_e4m3fn
            assert bool((torch.isfinite(request.hidden_scale) & (request.hidden_scale > 0)).all())
        else:
            assert request.hidden.dtype != torch.float8_e4m3fn
    elif header.kind is FrameKind.FFN_RESPONSE:
        assert partial_from_frame(header, tensors).shape[1] == HIDDEN
    return header.kind


class Outcomes:
    """Tallies what the decoder did; anything but success or a FrameError is a failure."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.slowest = 0.0

    def feed(self, buffer: bytes | bytearray, label: str) -> None:
        start = time.perf_counter()
        try:
            kind = decode_fully(buffer)
            self.counts[f"ok:{kind.name}"] += 1
        except FrameError as exc:
            self.counts[type(exc).__name__] += 1
            if "hidden_scale" in str(exc):
                self.counts[f"{type(exc).__name__}:hidden_scale"] += 1
        except Exception as exc:  # the property under test: nothing else may escape
            self.failures.append(f"{label}: {type(exc).__name__}: {exc} (buffer {bytes(buffer[:80])!r}...)")
        self.slowest = max(self.slowest, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Seeded mutation
# --------------------------------------------------------------------------------------------------


def valid_frames(rng: random.Random) -> list[bytes]:
    out = []
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for tokens in (0, 1, 3, 8):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ids = torch.randint(-1, 4, (tokens, 2), generator=gen, dtype=torch.int32)
            request = FfnRequest(
                layer=rng.randrange(3),
                hidden=torch.randn(tokens, HIDDEN, generator=gen).to(dtype),
                expert_ids=ids,
                expert_weights=torch.rand(tokens, 2, generator=gen),
                shared_scale=torch.rand(tokens, generator=gen) if tokens % 2 else None,
                microbatch=rng.randrange(4),
            )
            out.append(pack(*encode_request(request, rng.randrange(2**40), "attn-0")))
            dense = FfnRequest(layer=1, hidden=request.hidden)
            out.append(pack(*encode_request(dense, 3, "attn-1")))
            out.append(pack(*encode_response(request.hidden, 2, 0, 5, "ffn-0")))
        # the fp8 wire: float8_e4m3fn hidden states with a float32 scale per token
        quantized, scale = quantize_fp8(torch.randn(tokens, HIDDEN, generator=gen))
        ids = torch.randint(-1, 4, (tokens, 2), generator=gen, dtype=torch.int32)
        for routed in (True, False):
            fp8 = FfnRequest(
                layer=rng.randrange(3),
                hidden=quantized,
                hidden_scale=scale,
                expert_ids=ids if routed else None,
                expert_weights=torch.rand(tokens, 2, generator=gen) if routed else None,
                shared_scale=torch.rand(tokens, generator=gen) if tokens % 2 else None,
            )
            out.append(pack(*encode_request(fp8, rng.randrange(2**40), "attn-0")))
    out.append(pack(*encode_error("expert exploded", 1, 0, 9, "ffn-1")))
    return out


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 2 else 9)
    if choice == 0:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 65, 4096])
    if choice == 1:
        return rng.randrange(-5, 70)
    if choice == 2:
        return rng.choice([0.5, float("nan"), float("inf"), -0.0])
    if choice == 3:
        return rng.choice(
            ["", "hidden", "partial", "expert_ids", "hidden_scale", "bfloat16", "float8_e4m3fn", "float64", "x" * 300]
        )
    if choice == 4:
        return rng.randbytes(rng.randrange(6))
    if choice == 5:
        return None
    if choice == 6:
        return rng.choice([True, False])
    if choice == 7:
        return rng.choice(list(frames.WIRE_DTYPES))
    if choice == 8:
        return [rng.randrange(-2, 40) for _ in range(rng.randrange(5))]
    if choice == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 10:
        return {str(random_value(rng, depth + 1))[:8]: random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return msgpack.ExtType(rng.randrange(128), rng.randbytes(3))


def split(buffer: bytes) -> tuple[dict[str, Any], bytes]:
    _, length = frames.PREFIX.unpack_from(buffer, 0)
    header = msgpack.unpackb(buffer[8 : 8 + length], raw=False)
    return header, buffer[8 + length :]


def reassemble(rng: random.Random, header: dict[str, Any], payload: bytes) -> bytes:
    """Re-pack an edited header; usually with a payload resized to what the header now announces."""
    encoded = msgpack.packb(header, use_bin_type=True)
    start = frames._aligned(frames.PREFIX.size + len(encoded))
    padding = bytes(start - frames.PREFIX.size - len(encoded))
    wanted = announced_size(header)
    if wanted is not None and wanted <= 2**20 and rng.random() < 0.8:
        payload = (payload + rng.randbytes(max(0, wanted - len(payload))))[:wanted]
    return frames.PREFIX.pack(frames.MAGIC, len(encoded)) + encoded + padding + payload


def announced_size(header: dict[str, Any]) -> int | None:
    """Payload bytes (with alignment) the header announces, if its tensor list is well-formed enough."""
    try:
        offset = 0
        for _, dtype, shape in header["tensors"]:
            offset = frames._aligned(offset)
            size = frames.WIRE_DTYPES[dtype].itemsize
            for dim in shape:
                size *= int(dim)
            offset += size
        return offset if offset >= 0 else None
    except Exception:
        return None


def edit_header(rng: random.Random, buffer: bytes) -> bytes:
    header, payload = split(buffer)
    action = rng.randrange(6)
    keys = list(header)
    if action == 0:
        header[rng.choice(keys)] = random_value(rng)
    elif action == 1:
        del header[rng.choice(keys)]
    elif action == 2:
        header[rng.choice(["extra", "error", "V", "", "tensors2"])] = random_value(rng)
    elif header["tensors"]:
        entry = rng.choice(header["tensors"])
        if action == 3:
            entry[rng.randrange(3)] = random_value(rng)
        elif action == 4:
            shape = entry[2]
            if shape:
                shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, -1, 31, 32, 33, HIDDEN + 1, 2**40])
            else:
                entry[2] = [1]
        else:
            header["tensors"] = rng.sample(header["tensors"], len(header["tensors"]))
    return reassemble(rng, header, payload)


def edit_payload_values(rng: random.Random, buffer: bytes) -> bytes:
    """Valid header, payload bytes randomised: hits the expert-id range check and bfloat16 NaN patterns."""
    _, length = frames.PREFIX.unpack_from(buffer, 0)
    header = buffer[8 : 8 + length]
    tensors = []
    for spec in frames.decode_header(header, LIMITS).tensor_specs():
        nbytes = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
        raw = torch.tensor(list(rng.randbytes(nbytes)), dtype=torch.uint8)
        tensors.append(raw.view(spec.dtype).view(spec.shape))
    return pack(header, tensors)


def flip_bits(rng: random.Random, buffer: bytes) -> bytes:
    data = bytearray(buffer)
    for _ in range(rng.randrange(1, 9)):
        index = rng.randrange(len(data))
        data[index] ^= 1 << rng.randrange(8)
    return bytes(data)


def flip_header_bits(rng: random.Random, buffer: bytes) -> bytes:
    _, length = frames.PREFIX.unpack_from(buffer, 0)
    data = bytearray(buffer)
    for _ in range(rng.randrange(1, 4)):
        index = 8 + rng.randrange(length)
        data[index] = rng.randrange(256)
    return bytes(data)


MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "random_bytes": lambda rng, _: rng.randbytes(rng.randrange(400)),
    "random_after_magic": lambda rng, _: frames.MAGIC + rng.randbytes(rng.randrange(400)),
    "flip_bits": flip_bits,
    "flip_header_bits": flip_header_bits,
    "truncate": lambda rng, b: b[: rng.randrange(len(b))],
    "extend": lambda rng, b: b + rng.randbytes(rng.randrange(1, 40)),
    "header_length": lambda rng, b: b[:4] + struct.pack("<I", rng.randrange(2**32)) + b[8:],
    "edit_header": edit_header,
    "edit_payload_values": edit_payload_values,
}


def test_seeded_mutation_fuzz() -> None:
    rng = random.Random(20240601)
    bases = valid_frames(rng)
    outcomes = Outcomes()
    for base in bases:  # the unmutated frames must decode
        outcomes.feed(base, "valid")
    assert not outcomes.failures and sum(v for k, v in outcomes.counts.items() if k.startswith("ok:")) == len(bases)
    names = list(MUTATORS)
    iterations = 12_000
    for i in range(iterations):
        name = names[i % len(names)]
        buffer = MUTATORS[name](rng, rng.choice(bases))
        outcomes.feed(buffer, f"#{i} {name}")
    assert not outcomes.failures, "\n".join(outcomes.failures[:20])
    assert outcomes.slowest < SLOW_CALL_SECONDS, f"slowest decode took {outcomes.slowest:.3f}s"
    fed = sum(outcomes.counts.values())
    assert fed >= 10_000
    # the fuzz reaches every validation layer, not just the magic check
    for error in ("MalformedFrame", "MalformedHeader", "UnknownField", "BadDtype", "ShapeMismatch", "OutOfRange"):
        assert outcomes.counts[error] > 0, f"no {error} among {outcomes.counts}"
    assert outcomes.counts["PayloadMismatch"] > 0 and outcomes.counts["ok:FFN_REQUEST"] > len(bases)
    # and the fp8 wire's scales are checked for dtype, shape and value (finite, positive)
    for error in ("BadDtype", "ShapeMismatch", "OutOfRange"):
        assert outcomes.counts[f"{error}:hidden_scale"] > 0, f"no {error} about hidden_scale among {outcomes.counts}"


# --------------------------------------------------------------------------------------------------
# Hypothesis: arbitrary headers and buffers
# --------------------------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
header_keys = st.sampled_from(["v", "kind", "layer", "mb", "seq", "sender", "tensors", "error", "x"])
tensor_entries = st.lists(
    st.tuples(
        st.sampled_from(["hidden", "hidden_scale", "partial", "expert_ids", "expert_weights", "shared_scale", "?"]),
        st.sampled_from([*frames.WIRE_DTYPES, "float64", "uint8"]),
        st.lists(st.integers(min_value=-2, max_value=40), max_size=3),
    ).map(list),
    max_size=5,
)


@st.composite
def plausible_headers(draw: st.DrawFn) -> dict[str, Any]:
    """Headers that are mostly right, with any field possibly replaced by anything."""
    header: dict[str, Any] = {
        "v": draw(st.sampled_from([1, 1, 1, 0, 2])),
        "kind": draw(st.sampled_from([1, 2, 3, 0, 4])),
        "layer": draw(st.integers(min_value=-2, max_value=4)),
        "mb": draw(st.integers(min_value=-2, max_value=4)),
        "seq": draw(st.integers(min_value=-2, max_value=2**64 - 1)),
        "sender": draw(st.text(max_size=5)),
        "tensors": draw(tensor_entries),
    }
    if draw(st.booleans()):
        header["error"] = draw(st.text(max_size=10))
    overrides = draw(st.dictionaries(header_keys, msgpack_values, max_size=2))
    header.update(overrides)
    return header


@settings(max_examples=600, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(header=plausible_headers(), payload_seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_hypothesis_headers(header: dict[str, Any], payload_seed: int) -> None:
    rng = random.Random(payload_seed)
    outcomes = Outcomes()
    outcomes.feed(reassemble(rng, header, b""), "hypothesis header")
    assert not outcomes.failures, outcomes.failures


@settings(max_examples=400, deadline=1000)
@given(st.binary(max_size=600))
def test_hypothesis_raw_bytes(buffer: bytes) -> None:
    outcomes = Outcomes()
    outcomes.feed(buffer, "raw bytes")
    outcomes.feed(frames.MAGIC + buffer, "raw bytes after magic")
    assert not outcomes.failures, outcomes.failures
    try:  # the bare header decoder, as tensor channels call it
        frames.decode_header(buffer, LIMITS)
    except FrameError:
        return
