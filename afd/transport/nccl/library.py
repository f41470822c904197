"""Our own small ctypes binding of libnccl: the dozen calls a pairwise NCCL channel needs, and nothing else.

Why this file exists. AFD links one attention node with one FFN node at a time, and FFN nodes join and
leave while the cluster serves. The obvious ways to reach NCCL from Python do not fit that:
- `torch.distributed` with the NCCL backend wants one process group whose world size is fixed when
  `init_process_group` runs; adding or removing an FFN node would mean tearing the whole group down on
  every node. Its sub-groups are carved out of that same world, so they do not help.
- cupy's `cupy.cuda.nccl` or a `pynccl` package would work per pair, but bring a second CUDA array
  library (or an unmaintained one) into every node just for eight functions.
- A C++ extension would need a compiler and the CUDA toolkit wherever AFD is installed.
ctypes over the `libnccl.so.2` that the `nvidia-nccl-cu12` / `nvidia-nccl-cu13` wheel ships (the same
file a CUDA build of torch already loads) costs nothing to install and lets each pair have its own
communicator of world size 2, created from a unique id that travels over the control plane.

What is bound: version, unique id, communicator init (plain and with a config), destroy, abort, async
error, group start/end, send, recv, error strings. Communicators are created *non-blocking*
(`ncclConfig_t.blocking = 0`); afd/transport/nccl/communicator.py says why and wraps one.

Nothing here needs a GPU to import. `load_library` raises NcclUnavailableError saying what is missing
(the library, or CUDA) and how to get it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from afd.errors import AfdError

NCCL_UNIQUE_ID_BYTES = 128
"""sizeof(ncclUniqueId): an opaque blob naming the bootstrap root of one communicator."""
LIBRARY_NAME = "libnccl.so.2"
WHEEL_MODULE = "nvidia.nccl"
"""Both the nvidia-nccl-cu12 and the nvidia-nccl-cu13 wheel install nvidia/nccl/lib/libnccl.so.2."""
MIN_VERSION = (2, 18, 0)
"""Oldest NCCL trusted here: non-blocking communicators that can be aborted while they form."""
FP8_VERSION = (2, 24, 0)
"""First NCCL with float8 data types."""
INSTALL_HINT = (
    "install it with `pip install 'afd[gpu]'` (the nvidia-nccl-cu12 wheel; use nvidia-nccl-cu13 with CUDA 13), "
    "or pass the path of a libnccl.so.2 explicitly"
)


class NcclUnavailableError(AfdError, RuntimeError):
    """NCCL cannot be used here: libnccl is missing or too old, or there is no CUDA device."""


class NcclError(AfdError, RuntimeError):
    """An NCCL call returned an error code."""

    def __init__(self, function: str, code: int, text: str, detail: str = "") -> None:
        self.function = function
        """The NCCL function that failed (or reported the error), e.g. "ncclGroupEnd"."""
        self.code = code
        """The ncclResult_t value."""
        name = RESULT_NAMES.get(code, f"result {code}")
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"{function} failed: {text} [{name}]{suffix}")


class Result(enum.IntEnum):
    """ncclResult_t."""

    SUCCESS = 0
    UNHANDLED_CUDA_ERROR = 1
    SYSTEM_ERROR = 2
    INTERNAL_ERROR = 3
    INVALID_ARGUMENT = 4
    INVALID_USAGE = 5
    REMOTE_ERROR = 6
    IN_PROGRESS = 7
    TIMEOUT = 8


RESULT_NAMES = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
    8: "ncclTimeout",
}


class DataType(enum.IntEnum):
    """ncclDataType_t."""

    INT8 = 0
    UINT8 = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    FLOAT32 = 7
    FLOAT64 = 8
    BFLOAT16 = 9
    FLOAT8_E4M3 = 10
    FLOAT8_E5M2 = 11


_TORCH_DTYPES: dict[torch.dtype, DataType] = {
    torch.int8: DataType.INT8,
    torch.uint8: DataType.UINT8,
    torch.int32: DataType.INT32,
    torch.int64: DataType.INT64,
    torch.float16: DataType.FLOAT16,
    torch.float32: DataType.FLOAT32,
    torch.float64: DataType.FLOAT64,
    torch.bfloat16: DataType.BFLOAT16,
}
for _name, _nccl in (("float8_e4m3fn", DataType.FLOAT8_E4M3), ("float8_e5m2", DataType.FLOAT8_E5M2)):
    if hasattr(torch, _name):  # torch builds without float8 simply cannot ask for it
        _TORCH_DTYPES[getattr(torch, _name)] = _nccl
_FP8 = frozenset({DataType.FLOAT8_E4M3, DataType.FLOAT8_E5M2})


def nccl_dtype(dtype: torch.dtype, version: tuple[int, int, int] | None = None) -> DataType:
    """The NCCL data type of a torch dtype; TypeError for one NCCL cannot carry (or not in `version`)."""
    try:
        nccl = _TORCH_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _TORCH_DTYPES)
        raise TypeError(f"NCCL has no data type for {dtype}; supported: {supported}") from None
    if nccl in _FP8 and version is not None and version < FP8_VERSION:
        raise TypeError(f"{dtype} needs NCCL {_dotted(FP8_VERSION)} or newer, this libnccl is {_dotted(version)}")
    return nccl


class DeviceBuffer(NamedTuple):
    """What ncclSend/ncclRecv take for one buffer."""

    ptr: int
    """Device address of the first element."""
    elements: int
    """Number of elements of `dtype` (the `count` argument of ncclSend/ncclRecv)."""
    dtype: DataType


def tensor_buffer(tensor: torch.Tensor, version: tuple[int, int, int] | None = None) -> DeviceBuffer:
    """`tensor` (contiguous, on a CUDA device) as an NCCL buffer of its own data type."""
    if not tensor.is_contiguous():
        raise ValueError("NCCL buffers must be contiguous tensors")
    return DeviceBuffer(tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype, version))


class UniqueId(ctypes.Structure):
    """ncclUniqueId: `char internal[128]`, passed by value to ncclCommInitRank."""

    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]

    @classmethod
    def from_bytes(cls, data: bytes) -> UniqueId:
        if len(data) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(data)}")
        unique_id = cls()
        ctypes.memmove(ctypes.addressof(unique_id), data, NCCL_UNIQUE_ID_BYTES)
        return unique_id

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), NCCL_UNIQUE_ID_BYTES)


class CommConfig(ctypes.Structure):
    """The leading fields of ncclConfig_t, exactly its whole layout in NCCL 2.14.

    ncclConfig_t is versioned and append-only: NCCL copies `size` bytes of it, checks `magic`, and gives
    every field the caller's `version` does not know its default. So declaring only the fields we set,
    stamped with the version that introduced them, stays valid for every later NCCL.
    """

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
    ]

    MAGIC = 0xCAFEBEEF
    VERSION = 21400
    """NCCL_VERSION(2, 14, 0): the first version with `blocking`."""

    @classmethod
    def make(cls, blocking: bool) -> CommConfig:
        return cls(ctypes.sizeof(cls), cls.MAGIC, cls.VERSION, int(blocking))


_Comm = ctypes.c_void_p
_Stream = ctypes.c_void_p
_SEND_RECV_ARGS = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _Comm, _Stream]
"""buffer, count, datatype, peer, comm, stream."""


@dataclass(frozen=True, slots=True)
class _Signature:
    name: str
    restype: Any
    argtypes: list[Any]
    required: bool = True


_SIGNATURES = [
    _Signature("ncclGetVersion", ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
    _Signature("ncclGetUniqueId", ctypes.c_int, [ctypes.POINTER(UniqueId)]),
    _Signature("ncclCommInitRank", ctypes.c_int, [ctypes.POINTER(_Comm), ctypes.c_int, UniqueId, ctypes.c_int]),
    _Signature(
        "ncclCommInitRankConfig",
        ctypes.c_int,
        [ctypes.POINTER(_Comm), ctypes.c_int, UniqueId, ctypes.c_int, ctypes.POINTER(CommConfig)],
    ),
    _Signature("ncclCommDestroy", ctypes.c_int, [_Comm]),
    _Signature("ncclCommAbort", ctypes.c_int, [_Comm]),
    _Signature("ncclCommGetAsyncError", ctypes.c_int, [_Comm, ctypes.POINTER(ctypes.c_int)]),
    _Signature("ncclGroupStart", ctypes.c_int, []),
    _Signature("ncclGroupEnd", ctypes.c_int, []),
    _Signature("ncclSend", ctypes.c_int, _SEND_RECV_ARGS),
    _Signature("ncclRecv", ctypes.c_int, _SEND_RECV_ARGS),
    _Signature("ncclGetErrorString", ctypes.c_char_p, [ctypes.c_int]),
    _Signature("ncclGetLastError", ctypes.c_char_p, [_Comm], required=False),
]


class NcclLibrary:
    """A loaded libnccl with typed, checked calls. Communicator and stream handles are plain ints."""

    def __init__(self, handle: Any, path: str) -> None:
        """`handle`: a ctypes.CDLL of libnccl (tests pass a stand-in with the same attributes)."""
        self.path = path
        self._functions: dict[str, Any] = {}
        missing = []
        for signature in _SIGNATURES:
            function = getattr(handle, signature.name, None)
            if function is None:
                if signature.required:
                    missing.append(signature.name)
                continue
            function.restype = signature.restype
            function.argtypes = signature.argtypes
            self._functions[signature.name] = function
        if missing:
            raise NcclUnavailableError(f"{path} is not a usable libnccl: it lacks {', '.join(missing)}")
        code = ctypes.c_int()
        self.check(self._functions["ncclGetVersion"](ctypes.pointer(code)), "ncclGetVersion")
        self.version = decode_version(code.value)
        """(major, minor, patch)."""
        if self.version < MIN_VERSION:
            found, needed = _dotted(self.version), _dotted(MIN_VERSION)
            raise NcclUnavailableError(f"{path} is NCCL {found}; AFD needs NCCL {needed} or newer: {INSTALL_HINT}")

    # -- errors --------------------------------------------------------------------------------------

    def error_string(self, code: int) -> str:
        text = self._functions["ncclGetErrorString"](code)
        return text.decode(errors="replace") if text else f"unknown NCCL result {code}"

    def last_error(self, comm: int | None) -> str:
        """NCCL's own description of the latest error ("" where this libnccl cannot tell)."""
        function = self._functions.get("ncclGetLastError")
        if function is None:
            return ""
        text = function(comm)
        return text.decode(errors="replace").strip() if text else ""

    def check(self, code: int, function: str, comm: int | None = None, allow_in_progress: bool = False) -> int:
        """Return `code` if it is success (or in progress, where allowed); raise NcclError otherwise."""
        if code == Result.SUCCESS or (allow_in_progress and code == Result.IN_PROGRESS):
            return code
        last = self.last_error(comm)  # process-wide in NCCL, so labelled as such rather than as the cause
        raise NcclError(function, code, self.error_string(code), f"NCCL's last error: {last}" if last else "")

    # -- calls ---------------------------------------------------------------------------------------

    def get_unique_id(self) -> bytes:
        unique_id = UniqueId()
        self.check(self._functions["ncclGetUniqueId"](ctypes.pointer(unique_id)), "ncclGetUniqueId")
        return unique_id.to_bytes()

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int, blocking: bool = True) -> int:
        """A communicator of `nranks` for the current CUDA device; non-blocking ones are still forming.

        A blocking call returns once every rank has joined. A non-blocking one returns at once: poll
        `comm_get_async_error` until it stops saying IN_PROGRESS (see Communicator.wait_ready).
        """
        comm = _Comm()
        uid = UniqueId.from_bytes(unique_id)
        if blocking:
            code = self._functions["ncclCommInitRank"](ctypes.pointer(comm), nranks, uid, rank)
            self.check(code, "ncclCommInitRank")
        else:
            config = ctypes.pointer(CommConfig.make(blocking=False))
            code = self._functions["ncclCommInitRankConfig"](ctypes.pointer(comm), nranks, uid, rank, config)
            if code not in (Result.SUCCESS, Result.IN_PROGRESS) and comm.value:
                self._functions["ncclCommAbort"](comm.value)  # a half-made communicator must not leak
            self.check(code, "ncclCommInitRankConfig", allow_in_progress=True)
        if not comm.value:
            raise NcclError("ncclCommInitRank", Result.INTERNAL_ERROR, "returned no communicator")
        return int(comm.value)

    def comm_get_async_error(self, comm: int) -> int:
        """The communicator's state: SUCCESS, IN_PROGRESS, or the error that broke it."""
        state = ctypes.c_int()
        self.check(self._functions["ncclCommGetAsyncError"](comm, ctypes.pointer(state)), "ncclCommGetAsyncError", comm)
        return state.value

    def comm_destroy(self, comm: int) -> None:
        self.check(self._functions["ncclCommDestroy"](comm), "ncclCommDestroy")

    def comm_abort(self, comm: int) -> None:
        self.check(self._functions["ncclCommAbort"](comm), "ncclCommAbort")

    def group_start(self) -> None:
        self.check(self._functions["ncclGroupStart"](), "ncclGroupStart")

    def group_end(self) -> int:
        """SUCCESS, or IN_PROGRESS when the group holds non-blocking communicators."""
        return self.check(self._functions["ncclGroupEnd"](), "ncclGroupEnd", allow_in_progress=True)

    def send(self, buffer: DeviceBuffer, peer: int, comm: int, stream: int) -> None:
        code = self._functions["ncclSend"](buffer.ptr, buffer.elements, int(buffer.dtype), peer, comm, stream)
        self.check(code, "ncclSend", comm, allow_in_progress=True)

    def recv(self, buffer: DeviceBuffer, peer: int, comm: int, stream: int) -> None:
        code = self._functions["ncclRecv"](buffer.ptr, buffer.elements, int(buffer.dtype), peer, comm, stream)
        self.check(code, "ncclRecv", comm, allow_in_progress=True)


def decode_version(code: int) -> tuple[int, int, int]:
    """NCCL_VERSION_CODE -> (major, minor, patch); before 2.9 the code was X*1000 + Y*100 + Z."""
    if code >= 10000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


# ---------------------------------------------------------------------------------------------------
# Finding and loading libnccl
# ---------------------------------------------------------------------------------------------------


def wheel_library_dirs() -> list[Path]:
    """nvidia/nccl/lib directories of installed nvidia-nccl-cu12/cu13 wheels."""
    try:
        spec = importlib.util.find_spec(WHEEL_MODULE)
    except (ImportError, ValueError):  # no `nvidia` namespace package at all
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) / "lib" for location in spec.submodule_search_locations]


def library_candidates(explicit: str | os.PathLike[str] | None = None) -> list[str]:
    """Where libnccl is looked for, in order.

    An explicit path is the only candidate: whoever names a file means that file, and silently loading
    another one would hide the mistake. Otherwise: the wheel's copy (the one a CUDA build of torch uses
    too, so both share one library in the process), then what the system's linker knows
    (`ctypes.util.find_library`), then the bare soname, which dlopen resolves through LD_LIBRARY_PATH
    and the ld cache.
    """
    if explicit is not None:
        return [os.fspath(explicit)]
    candidates = [str(directory / LIBRARY_NAME) for directory in wheel_library_dirs()]
    candidates = [path for path in candidates if os.path.isfile(path)]
    system = ctypes.util.find_library("nccl")
    if system:
        candidates.append(system)
    candidates.append(LIBRARY_NAME)
    return list(dict.fromkeys(candidates))


def _open_shared_object(path: str) -> Any:
    return ctypes.CDLL(path)


_LOADED: dict[str, NcclLibrary] = {}
_LOAD_LOCK = threading.Lock()


def load_library(path: str | os.PathLike[str] | None = None) -> NcclLibrary:
    """The first usable libnccl among `library_candidates(path)`, loaded once per process.

    Raises NcclUnavailableError listing every place tried and why it failed.
    """
    key = "" if path is None else os.fspath(path)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        failures = []
        for candidate in library_candidates(path):
            try:
                library = NcclLibrary(_open_shared_object(candidate), candidate)
            except OSError as exc:
                failures.append(f"{candidate}: {_short(exc)}")
                continue
            except NcclUnavailableError as exc:
                failures.append(str(exc))
                continue
            _LOADED[key] = library
            return library
    raise NcclUnavailableError(f"no usable libnccl found ({'; '.join(failures)}); {INSTALL_HINT}")


def _short(exc: OSError) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def require_cuda() -> None:
    """Raise NcclUnavailableError unless torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise NcclUnavailableError(
        f"NCCL channels need an NVIDIA GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, "
        f"{build}); run on a CUDA machine with a CUDA build of torch, or use the gloo, shm or grpc transport"
    )


def unavailable_reason(path: str | os.PathLike[str] | None = None) -> str | None:
    """Why NCCL cannot be used here (no CUDA device, no libnccl), or None if it can: for skips and CLIs."""
    try:
        require_cuda()
        load_library(path)
    except NcclUnavailableError as exc:
        return str(exc)
    return None
