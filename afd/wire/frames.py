"""The tensor frame: what one attention->FFN request or FFN->attention reply looks like on any wire.

A frame is a msgpack header plus the raw bytes of the tensors it announces. The header says what the
frame is (kind, layer, microbatch, sequence number, sender, and for requests the placement version
their local expert ids refer to) and, for every tensor, its name, dtype and shape; the tensors follow
in header order. Tensor backends (gloo, NCCL) send the header and then each
tensor on its own; byte-stream backends (gRPC, shared memory) `pack` both into one buffer:

    offset 0   b"AFDF"                 magic, so a stray buffer is told apart from a frame at once
    offset 4   uint32 little-endian    header length in bytes
    offset 8   header                  msgpack map (see `_encode_header`)
    then       each tensor's bytes, every one starting at a multiple of 8 (zero padding), no trailing bytes

Why msgpack and raw bytes rather than protobuf or pickle: the header is a handful of small fields that
msgpack parses in microseconds with hard limits on string and array sizes, the tensors need no
encoding at all (the receiver views them in place), and neither side can be made to run code by a
peer. bfloat16 travels as its raw bytes through uint8 views (numpy has no bfloat16).

The fp8 wire (`--wire-dtype fp8`): a request's `hidden` may be float8_e4m3fn, and then only together with
`hidden_scale` (`[num_tokens] float32`, one scale per token, each finite and positive; checked by
`request_from_frame` like the expert ids). Replies stay in a compute dtype.

The decoder trusts nothing: every field is type-checked, unknown fields and versions are rejected,
dtypes come from an allow-list, shapes must match the model (hidden size, top-k, token limit), the
payload length must equal the sum of shape x itemsize, and ids must be in range. Everything it rejects
raises a `FrameError` subclass, so a server can answer a bad frame with an ERROR frame and carry on.
"""

from __future__ import annotations

import enum
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import torch

from afd.dtypes import COMPUTE_DTYPES
from afd.errors import AfdError
from afd.ffn_messages import FP8_WIRE_DTYPE, FfnRequest
from afd.model_spec import ModelSpec
from afd.transport.staging import stage_once


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of one tensor announced by a frame header."""

    shape: tuple[int, ...]
    dtype: torch.dtype


FRAME_VERSION = 1
"""Bumped on any incompatible change of the header; a peer speaking another version is refused."""

MAGIC = b"AFDF"
PREFIX = struct.Struct("<4sI")
"""Magic and header length at the start of a packed frame."""
ALIGNMENT = 8
"""Every tensor in a packed frame starts at a multiple of this, so in-place views are aligned."""
MAX_HEADER_BYTES = 64 * 1024
"""A header is a few hundred bytes; anything near this is garbage or an attack."""
MAX_SENDER_CHARS = 256
MAX_ERROR_CHARS = 8192
"""ERROR messages longer than this are truncated by `encode_error` and refused by the decoder."""
MAX_INDEX = 2**31 - 1
"""Upper bound of layer and microbatch ids."""
MAX_SEQ = 2**63 - 1
UNKNOWN = -1
"""Layer, microbatch or seq of an ERROR frame answering a frame whose header could not be read."""

WIRE_DTYPES: dict[str, torch.dtype] = {**COMPUTE_DTYPES, "int32": torch.int32, "float8_e4m3fn": FP8_WIRE_DTYPE}
"""Every dtype a frame may carry, by wire name."""
_DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}

# torch.frombuffer warns, once per process, that a read-only `bytes` buffer yields a tensor it cannot
# protect from writes. Frames are read-only by contract (see `unpack`), so the warning says nothing new:
# spend the one warning here, silenced, rather than in the middle of a caller's data path.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of `dtype` (raises BadDtype for one frames cannot carry)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise BadDtype(f"dtype {dtype} cannot travel in a frame (supported: {sorted(WIRE_DTYPES)})") from None


class FrameKind(enum.IntEnum):
    FFN_REQUEST = 1
    """Attention -> FFN: hidden states of one layer and microbatch, with local expert ids and weights."""
    FFN_RESPONSE = 2
    """FFN -> attention: the partial sum for the request with the same seq."""
    ERROR = 3
    """FFN -> attention: the request with this seq (or an unreadable frame, seq -1) failed; carries a message."""


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


class FrameError(AfdError, ValueError):
    """A frame failed validation; the message says which field and why."""


class MalformedFrame(FrameError):
    """The packed buffer is not a frame: bad magic, truncated, or trailing bytes."""


class MalformedHeader(FrameError):
    """The header is not a msgpack map of the expected fields and types."""


class UnknownField(MalformedHeader):
    """The header has a field this version does not define."""


class UnsupportedVersion(FrameError):
    """The header's version is not FRAME_VERSION."""


class BadDtype(FrameError):
    """A tensor's dtype is not allowed (or not the one its name requires)."""


class ShapeMismatch(FrameError):
    """A tensor's shape disagrees with the model or with the other tensors of the frame."""


class PayloadMismatch(FrameError):
    """The bytes or tensors that follow the header do not match what the header announces."""


class OutOfRange(FrameError):
    """A layer, microbatch, sequence number or expert id is outside its valid range."""


class FrameTooLarge(FrameError):
    """The frame is larger than FrameLimits allow (bytes, tokens or header size)."""


# ---------------------------------------------------------------------------------------------------
# Limits and header
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a receiver accepts: the model's sizes plus hard caps, so no peer can make it allocate at will."""

    hidden_size: int
    """Width of `hidden` and `partial` tensors."""
    num_layers: int
    """Decoder layers; a frame's layer must be in [0, num_layers)."""
    top_k: int
    """Columns of `expert_ids` / `expert_weights` (experts chosen per token); 0 for a dense model."""
    max_local_experts: int
    """Experts held by the receiving FFN node; local expert ids must be in [-1, max_local_experts)."""
    max_tokens: int = 65536
    """Most tokens (rows) one frame may carry."""
    max_frame_bytes: int = 256 * 2**20
    """Most bytes of one frame, header and tensors together."""
    allowed_dtypes: frozenset[str] = frozenset(COMPUTE_DTYPES)
    """Wire names of the dtypes allowed for `hidden` and `partial` (ids are int32, weights float32 always)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "max_tokens", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"FrameLimits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("top_k", "max_local_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"FrameLimits.{name} must be >= 0, got {getattr(self, name)}")
        unknown = set(self.allowed_dtypes) - set(COMPUTE_DTYPES)
        if unknown or not self.allowed_dtypes:
            raise ValueError(f"FrameLimits.allowed_dtypes must be a non-empty subset of {sorted(COMPUTE_DTYPES)}")

    @classmethod
    def for_model(cls, spec: ModelSpec, max_local_experts: int | None = None, **caps: Any) -> FrameLimits:
        """Limits for `spec`; `max_local_experts` defaults to every expert (for receivers of replies)."""
        top_k = next((layer.moe.top_k for layer in spec.layers if layer.moe is not None), 0)
        local = spec.num_experts if max_local_experts is None else max_local_experts
        return cls(spec.hidden_size, spec.num_layers, top_k, local, **caps)


class TensorDescriptor(NamedTuple):
    """One tensor announced by a header."""

    name: str
    dtype: str
    """Wire dtype name (a key of WIRE_DTYPES)."""
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded, validated frame header."""

    version: int
    kind: FrameKind
    layer: int
    """Decoder layer (UNKNOWN in an ERROR frame answering an unreadable one)."""
    microbatch: int
    """Microbatch id within the sender's step."""
    seq: int
    """Sender's sequence number; a reply carries its request's seq."""
    sender: str
    """Node id of the sender (for logs and error messages)."""
    tensors: tuple[TensorDescriptor, ...]
    """The tensors that follow, in order."""
    error: str | None = None
    """ERROR frames only: what went wrong."""
    placement_version: int = 0
    """FFN_REQUEST frames only: the expert placement the local expert ids refer to."""
    limits: FrameLimits | None = field(default=None, compare=False, repr=False)
    """The limits the header was validated against (request_from_frame checks expert ids with them)."""

    def tensor_specs(self) -> list[TensorSpec]:
        return [TensorSpec(tuple(t.shape), WIRE_DTYPES[t.dtype]) for t in self.tensors]

    @property
    def payload_bytes(self) -> int:
        """Raw tensor bytes announced (without alignment padding)."""
        return sum(t.nbytes for t in self.tensors)


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------

_REQUEST_TENSORS = tuple(
    ["hidden", *scale, *routed, *shared]
    for scale in ([], ["hidden_scale"])
    for routed in ([], ["expert_ids", "expert_weights"])
    for shared in ([], ["shared_scale"])
)
"""Tensor lists an FFN_REQUEST frame may carry, in this order."""
FP8_HIDDEN_DTYPES = frozenset({"float8_e4m3fn"})
"""Wire names of the dtypes `hidden` may have when `hidden_scale` comes with it (the fp8 wire)."""

_COMMON_KEYS = frozenset({"v", "kind", "layer", "mb", "seq", "sender", "tensors"})
_KEYS = {
    FrameKind.FFN_REQUEST: _COMMON_KEYS | {"pv"},
    FrameKind.FFN_RESPONSE: _COMMON_KEYS,
    FrameKind.ERROR: _COMMON_KEYS | {"error"},
}


def encode_request(request: FfnRequest, seq: int, sender: str) -> tuple[bytes, list[torch.Tensor]]:
    """Header bytes and the tensors of `request` (hidden, hidden_scale / expert_ids, expert_weights /
    shared_scale where set)."""
    named: list[tuple[str, torch.Tensor]] = [("hidden", request.hidden)]
    if request.hidden_scale is not None:
        named.append(("hidden_scale", request.hidden_scale))
    if (request.expert_ids is None) != (request.expert_weights is None):
        raise ValueError("FfnRequest needs both expert_ids and expert_weights, or neither")
    if request.expert_ids is not None and request.expert_weights is not None:
        named += [("expert_ids", request.expert_ids), ("expert_weights", request.expert_weights)]
    if request.shared_scale is not None:
        named.append(("shared_scale", request.shared_scale))
    extra = {"pv": int(request.placement_version)}
    return _encode(FrameKind.FFN_REQUEST, request.layer, request.microbatch, seq, sender, named, extra)


def encode_response(
    partial: torch.Tensor, layer: int, microbatch: int, seq: int, sender: str
) -> tuple[bytes, list[torch.Tensor]]:
    """partial: `[num_tokens, hidden_size]` in the hidden dtype, the reply to request `seq`."""
    return _encode(FrameKind.FFN_RESPONSE, layer, microbatch, seq, sender, [("partial", partial)])


def encode_error(message: str, layer: int, microbatch: int, seq: int, sender: str) -> tuple[bytes, list[torch.Tensor]]:
    """An ERROR frame (no tensors) answering request `seq` (UNKNOWN when the request was unreadable)."""
    return _encode(FrameKind.ERROR, layer, microbatch, seq, sender, [], {"error": message[:MAX_ERROR_CHARS]})


def _encode(
    kind: FrameKind,
    layer: int,
    microbatch: int,
    seq: int,
    sender: str,
    named: list[tuple[str, torch.Tensor]],
    extra: dict[str, Any] | None = None,
) -> tuple[bytes, list[torch.Tensor]]:
    tensors = []
    described = []
    for name, tensor in named:
        if tensor.dtype not in _DTYPE_NAMES:
            raise BadDtype(f"tensor {name!r} has dtype {tensor.dtype}, which frames cannot carry")
        described.append([name, _DTYPE_NAMES[tensor.dtype], list(tensor.shape)])
        tensors.append(tensor)
    header: dict[str, Any] = {
        "v": FRAME_VERSION,
        "kind": int(kind),
        "layer": int(layer),
        "mb": int(microbatch),
        "seq": int(seq),
        "sender": sender,
        "tensors": described,
        **(extra or {}),
    }
    return msgpack.packb(header, use_bin_type=True), tensors


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def decode_header(header: bytes | memoryview, limits: FrameLimits) -> FrameHeader:
    """Parse and validate a header; raises a FrameError subclass naming the bad field."""
    if len(header) > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = msgpack.unpackb(
            header,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_ERROR_CHARS * 4,
            max_bin_len=0,
            max_array_len=64,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError...)
        raise MalformedHeader(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedHeader(f"header must be a map, got {type(raw).__name__}")
    version = _int_field(raw, "v", 0, MAX_INDEX)
    if version != FRAME_VERSION:
        raise UnsupportedVersion(f"frame version {version} is not supported (this node speaks {FRAME_VERSION})")
    kind_value = _int_field(raw, "kind", 0, MAX_INDEX)
    try:
        kind = FrameKind(kind_value)
    except ValueError:
        raise MalformedHeader(f"unknown frame kind {kind_value}") from None
    expected_keys = _KEYS[kind]
    unknown = set(raw) - expected_keys
    if unknown:
        raise UnknownField(f"unknown header fields {sorted(map(str, unknown))} for a {kind.name} frame")
    missing = expected_keys - set(raw)
    if missing:
        raise MalformedHeader(f"header lacks fields {sorted(missing)}")
    lowest = UNKNOWN if kind is FrameKind.ERROR else 0
    layer = _int_field(raw, "layer", lowest, MAX_INDEX)
    if kind is not FrameKind.ERROR and layer >= limits.num_layers:
        raise OutOfRange(f"layer {layer} out of range [0, {limits.num_layers})")
    microbatch = _int_field(raw, "mb", lowest, MAX_INDEX)
    seq = _int_field(raw, "seq", lowest, MAX_SEQ)
    sender = _str_field(raw, "sender", MAX_SENDER_CHARS)
    if not sender:
        raise MalformedHeader("sender must not be empty")
    error = _str_field(raw, "error", MAX_ERROR_CHARS) if kind is FrameKind.ERROR else None
    placement_version = _int_field(raw, "pv", 0, MAX_SEQ) if kind is FrameKind.FFN_REQUEST else 0
    tensors = _tensor_descriptors(raw["tensors"])
    _check_tensors(kind, tensors, limits)
    return FrameHeader(version, kind, layer, microbatch, seq, sender, tensors, error, placement_version, limits)


def best_effort_seq(header: bytes | memoryview) -> int:
    """The `seq` of a header that failed validation, if one can be read at all (else UNKNOWN).

    Lets a server answer even a bad frame with an ERROR frame the sender can match to its request.
    """
    try:
        raw = msgpack.unpackb(header, raw=False, max_bin_len=0, max_ext_len=0, max_array_len=64, max_map_len=16)
    except Exception:  # anything unreadable simply has no seq
        return UNKNOWN
    seq = raw.get("seq") if isinstance(raw, dict) else None
    return seq if type(seq) is int and 0 <= seq <= MAX_SEQ else UNKNOWN


def packed_frame_seq(buffer: bytes | bytearray | memoryview) -> int:
    """`best_effort_seq` of a packed frame (UNKNOWN when not even the prefix is readable)."""
    if len(buffer) < PREFIX.size:
        return UNKNOWN
    magic, header_len = PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC or header_len > MAX_HEADER_BYTES:
        return UNKNOWN
    return best_effort_seq(memoryview(buffer)[PREFIX.size : PREFIX.size + header_len])


def _int_field(raw: dict[str, Any], key: str, low: int, high: int) -> int:
    if key not in raw:
        raise MalformedHeader(f"header lacks field {key!r}")
    value = raw[key]
    if type(value) is not int:  # bool is an int subclass; refuse it
        raise MalformedHeader(f"header field {key!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise OutOfRange(f"header field {key!r} = {value} out of range [{low}, {high}]")
    return value


def _str_field(raw: dict[str, Any], key: str, max_chars: int) -> str:
    value = raw[key]
    if type(value) is not str:
        raise MalformedHeader(f"header field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise FrameTooLarge(f"header field {key!r} has {len(value)} characters, more than {max_chars}")
    return value


def _tensor_descriptors(raw: Any) -> tuple[TensorDescriptor, ...]:
    if type(raw) is not list:
        raise MalformedHeader(f"header field 'tensors' must be a list, got {type(raw).__name__}")
    out = []
    for index, entry in enumerate(raw):
        if type(entry) is not list or len(entry) != 3:
            raise MalformedHeader(f"tensors[{index}] must be [name, dtype, shape]")
        name, dtype, shape = entry
        if type(name) is not str or type(dtype) is not str or type(shape) is not list:
            raise MalformedHeader(f"tensors[{index}] must be [str, str, list of int]")
        if dtype not in WIRE_DTYPES:
            raise BadDtype(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        if len(shape) > 4 or any(type(d) is not int or d < 0 for d in shape):
            raise ShapeMismatch(f"tensor {name!r}: shape {shape} must be at most 4 non-negative integers")
        out.append(TensorDescriptor(name, dtype, tuple(shape)))
    return tuple(out)


def _check_tensors(kind: FrameKind, tensors: tuple[TensorDescriptor, ...], limits: FrameLimits) -> None:
    names = [t.name for t in tensors]
    if kind is FrameKind.ERROR:
        if tensors:
            raise PayloadMismatch(f"an ERROR frame carries no tensors, got {names}")
        return
    if kind is FrameKind.FFN_RESPONSE:
        if names != ["partial"]:
            raise MalformedHeader(f"an FFN_RESPONSE frame carries exactly ['partial'], got {names}")
    else:
        if names not in _REQUEST_TENSORS:
            raise MalformedHeader(
                f"an FFN_REQUEST frame carries tensors {_REQUEST_TENSORS}, in that order; got {names}"
            )
    first = tensors[0]
    if len(first.shape) != 2:
        raise ShapeMismatch(f"{first.name} must be [num_tokens, hidden_size], got shape {first.shape}")
    num_tokens = first.shape[0]
    if num_tokens > limits.max_tokens:
        raise FrameTooLarge(f"{num_tokens} tokens exceed the limit of {limits.max_tokens}")
    # fp8 hidden states come with their per-token scales, and only then (the reply is in a compute dtype)
    scaled = "hidden_scale" in names
    if scaled and first.dtype not in FP8_HIDDEN_DTYPES:
        raise BadDtype(f"hidden_scale comes only with hidden in {sorted(FP8_HIDDEN_DTYPES)}, not {first.dtype!r}")
    if not scaled and first.dtype not in limits.allowed_dtypes:
        raise BadDtype(f"{first.name}: dtype {first.dtype!r} is not allowed (allowed: {sorted(limits.allowed_dtypes)})")
    expected = {
        "hidden": (first.dtype, (num_tokens, limits.hidden_size)),
        "partial": (first.dtype, (num_tokens, limits.hidden_size)),
        "expert_ids": ("int32", (num_tokens, limits.top_k)),
        "expert_weights": ("float32", (num_tokens, limits.top_k)),
        "shared_scale": ("float32", (num_tokens,)),
        "hidden_scale": ("float32", (num_tokens,)),
    }
    for tensor in tensors:
        dtype, shape = expected[tensor.name]
        if tensor.dtype != dtype:
            raise BadDtype(f"{tensor.name} must be {dtype}, got {tensor.dtype}")
        if tensor.shape != shape:
            raise ShapeMismatch(f"{tensor.name} must have shape {list(shape)}, got {list(tensor.shape)}")
    total = sum(t.nbytes for t in tensors)
    if total > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame payload of {total} bytes exceeds the limit of {limits.max_frame_bytes}")


def check_tensors(header: FrameHeader, tensors: Sequence[torch.Tensor]) -> None:
    """Raise PayloadMismatch unless `tensors` are exactly the ones `header` announces (count, dtype, shape)."""
    if len(tensors) != len(header.tensors):
        raise PayloadMismatch(f"header announces {len(header.tensors)} tensors, got {len(tensors)}")
    for described, tensor in zip(header.tensors, tensors, strict=True):
        if tensor.dtype != WIRE_DTYPES[described.dtype] or tuple(tensor.shape) != described.shape:
            raise PayloadMismatch(
                f"{described.name}: header says {described.dtype}{list(described.shape)}, "
                f"got {tensor.dtype}{list(tensor.shape)}"
            )


def request_from_frame(header: FrameHeader, tensors: list[torch.Tensor]) -> FfnRequest:
    """The FfnRequest a validated FFN_REQUEST frame carries; checks local expert ids against the header's limits."""
    if header.kind is not FrameKind.FFN_REQUEST:
        raise MalformedHeader(f"expected an FFN_REQUEST frame, got {header.kind.name}")
    check_tensors(header, tensors)
    named = {d.name: t for d, t in zip(header.tensors, tensors, strict=True)}
    expert_ids = named.get("expert_ids")
    if expert_ids is not None and expert_ids.numel() and header.limits is not None:
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if low < -1 or high >= header.limits.max_local_experts:
            raise OutOfRange(f"local expert ids span [{low}, {high}], outside [-1, {header.limits.max_local_experts})")
    hidden_scale = named.get("hidden_scale")
    if hidden_scale is not None and hidden_scale.numel():
        # a zero, negative or non-finite scale would turn the whole token into 0, inf or nan on the FFN node
        bad = ~(torch.isfinite(hidden_scale) & (hidden_scale > 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise OutOfRange(f"hidden_scale[{row}] = {float(hidden_scale[row])} must be finite and positive")
    return FfnRequest(
        layer=header.layer,
        hidden=named["hidden"],
        hidden_scale=hidden_scale,
        expert_ids=expert_ids,
        expert_weights=named.get("expert_weights"),
        shared_scale=named.get("shared_scale"),
        microbatch=header.microbatch,
        placement_version=header.placement_version,
    )


def partial_from_frame(header: FrameHeader, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The partial sum `[num_tokens, hidden_size]` of a validated FFN_RESPONSE frame."""
    if header.kind is not FrameKind.FFN_RESPONSE:
        raise MalformedHeader(f"expected an FFN_RESPONSE frame, got {header.kind.name}")
    check_tensors(header, tensors)
    return tensors[0]


# ---------------------------------------------------------------------------------------------------
# One-buffer framing for byte streams
# ---------------------------------------------------------------------------------------------------


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (copied only when strided); device tensors are staged before this."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def pack_parts(header: bytes, tensors: Sequence[torch.Tensor]) -> tuple[list[bytes | memoryview], int]:
    """The pieces of a packed frame, in order, and their total length; joining them gives `pack`'s buffer.

    For senders that put their own envelope in front (the gRPC DataFrame) without an extra copy. The
    memoryviews alias the tensors themselves when contiguous on the CPU, else CPU copies of them, so join
    them before changing the tensors. Tensors on an accelerator are first staged in pinned host memory
    (afd.transport.staging: non-blocking copies, one synchronize per frame); a sender that keeps a
    `HostStaging` passes the tensors of its `host_tensors` block instead, and nothing is staged here.
    """
    if len(header) > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    tensors = stage_once(tensors)  # CPU tensors come back as they are
    parts: list[bytes | memoryview] = [PREFIX.pack(MAGIC, len(header)), header]
    offset = PREFIX.size + len(header)
    for tensor in tensors:
        start = _aligned(offset)
        if start > offset:
            parts.append(bytes(start - offset))
        data = _raw_bytes(tensor)
        parts.append(data)
        offset = start + data.nbytes
    return parts, offset


def pack(header: bytes, tensors: Sequence[torch.Tensor]) -> bytes:
    """One buffer: magic, header length, header, then each tensor's raw bytes at an 8-byte aligned offset.

    Copies each tensor exactly once (device tensors are first staged in pinned host memory).
    """
    parts, _ = pack_parts(header, tensors)
    return b"".join(parts)


def unpack(buffer: bytes | bytearray | memoryview, limits: FrameLimits) -> tuple[FrameHeader, list[torch.Tensor]]:
    """Header and tensors of a packed frame; raises a FrameError subclass on anything invalid.

    The tensors are views into `buffer` (no copy): treat them as read-only, and keep the buffer alive
    while they are in use (the views hold a reference to it).
    """
    size = len(buffer)
    if size > limits.max_frame_bytes + MAX_HEADER_BYTES + PREFIX.size + 64:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {limits.max_frame_bytes}")
    if size < PREFIX.size:
        raise MalformedFrame(f"a frame has at least {PREFIX.size} bytes, got {size}")
    magic, header_len = PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise MalformedFrame(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if header_len > MAX_HEADER_BYTES or PREFIX.size + header_len > size:
        raise MalformedFrame(f"header length {header_len} does not fit a frame of {size} bytes")
    view = memoryview(buffer)
    header = decode_header(view[PREFIX.size : PREFIX.size + header_len], limits)
    offset = PREFIX.size + header_len
    spans = []
    for described in header.tensors:
        start = _aligned(offset)
        spans.append((start, described.nbytes))
        offset = start + described.nbytes
    if offset != size:
        raise PayloadMismatch(f"header announces a frame of {offset} bytes, got {size}")
    tensors = []
    previous_end = PREFIX.size + header_len
    for described, (start, nbytes) in zip(header.tensors, spans, strict=True):
        if any(view[previous_end:start]):
            raise MalformedFrame(f"non-zero padding before tensor {described.name!r}")
        previous_end = start + nbytes
        dtype = WIRE_DTYPES[described.dtype]
        if nbytes == 0:
            tensors.append(torch.empty(described.shape, dtype=dtype))
            continue
        data = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=start)
        tensors.append(data.view(dtype).view(described.shape))
    return header, tensors
