"""The NCCL wrapper without a GPU: discovery, the no-NCCL error, dtypes, structs, error codes, the
non-blocking communicator's call sequence and deadlines (against a fake libnccl), envelopes, rendezvous."""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pytest
import torch

from afd.errors import AfdError, ConfigError
from afd.transport.envelope import FIELDS, EnvelopeKind, MalformedEnvelope, pack_envelope
from afd.transport.nccl import channel as nccl_channel
from afd.transport.nccl import library
from afd.transport.nccl.channel import NcclChannel, NcclOptions
from afd.transport.nccl.communicator import Communicator, poll_until
from afd.transport.nccl.first_message import ENVELOPE_BYTES, HEADER_ROOM, pack_first_message, parse_first_message
from afd.transport.nccl.library import (
    DataType,
    DeviceBuffer,
    NcclError,
    NcclLibrary,
    NcclUnavailableError,
    UniqueId,
    nccl_dtype,
)
from afd.transport.nccl.pairing import PAIR_ID_BYTES, check_nccl_rendezvous, nccl_rendezvous
from afd.transport.nccl.selftest import _sizes, make_header, read_header
from afd.transport.rendezvous import RendezvousError, pack_rendezvous

VERSION_2_21_5 = 22105
IN_PROGRESS = 7


def _function(body: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function object (NcclLibrary sets argtypes/restype on it, as on a ctypes function)."""

    def call(*args: Any) -> Any:
        return body(*args)

    return call


class FakeNccl:
    """Stands in for ctypes.CDLL("libnccl.so.2"): records calls, answers with scripted result codes."""

    ERRORS: ClassVar[dict[int, bytes]] = {
        0: b"no error",
        4: b"invalid argument (run with NCCL_DEBUG=WARN for details)",
        5: b"invalid usage (run with NCCL_DEBUG=WARN for details)",
        6: b"remote process exited or there was a network error",
        7: b"NCCL operation in progress",
    }

    def __init__(self, version: int = VERSION_2_21_5, omit: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.version = version
        self.states: list[int] = []
        """Results of successive ncclCommGetAsyncError calls; the last one repeats."""
        self.results: dict[str, int] = {}
        """Result code each function returns (default success)."""
        self.config: dict[str, int] = {}
        for name in (
            "ncclGetVersion",
            "ncclGetUniqueId",
            "ncclCommInitRank",
            "ncclCommInitRankConfig",
            "ncclCommDestroy",
            "ncclCommAbort",
            "ncclCommGetAsyncError",
            "ncclGroupStart",
            "ncclGroupEnd",
            "ncclSend",
            "ncclRecv",
            "ncclGetErrorString",
            "ncclGetLastError",
        ):
            if name not in omit:
                setattr(self, name, _function(getattr(self, "_" + name)))

    def _record(self, name: str, *args: Any) -> int:
        self.calls.append((name, *args))
        return self.results.get(name, 0)

    def _ncclGetVersion(self, version: Any) -> int:
        version.contents.value = self.version
        return self._record("ncclGetVersion")

    def _ncclGetUniqueId(self, unique_id: Any) -> int:
        ctypes.memmove(ctypes.addressof(unique_id.contents), bytes(range(128)), 128)
        return self._record("ncclGetUniqueId")

    def _ncclCommInitRank(self, comm: Any, nranks: int, unique_id: UniqueId, rank: int) -> int:
        comm.contents.value = 0x1000 + rank
        return self._record("ncclCommInitRank", nranks, unique_id.to_bytes(), rank)

    def _ncclCommInitRankConfig(self, comm: Any, nranks: int, unique_id: UniqueId, rank: int, config: Any) -> int:
        comm.contents.value = 0x1000 + rank
        fields = config.contents
        self.config = {name: getattr(fields, name) for name in ("size", "magic", "version", "blocking")}
        return self._record("ncclCommInitRankConfig", nranks, unique_id.to_bytes(), rank) or IN_PROGRESS

    def _ncclCommDestroy(self, comm: int) -> int:
        return self._record("ncclCommDestroy", comm)

    def _ncclCommAbort(self, comm: int) -> int:
        return self._record("ncclCommAbort", comm)

    def _ncclCommGetAsyncError(self, comm: int, state: Any) -> int:
        state.contents.value = self.states.pop(0) if len(self.states) > 1 else (self.states or [0])[0]
        return self._record("ncclCommGetAsyncError", comm)

    def _ncclGroupStart(self) -> int:
        return self._record("ncclGroupStart")

    def _ncclGroupEnd(self) -> int:
        return self._record("ncclGroupEnd")

    def _ncclSend(self, ptr: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> int:
        return self._record("ncclSend", ptr, count, dtype, peer, comm, stream)

    def _ncclRecv(self, ptr: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> int:
        return self._record("ncclRecv", ptr, count, dtype, peer, comm, stream)

    def _ncclGetErrorString(self, code: int) -> bytes:
        return self.ERRORS.get(code, b"unknown result code")

    def _ncclGetLastError(self, comm: int | None) -> bytes:
        return b""


@pytest.fixture
def fake() -> FakeNccl:
    return FakeNccl()


@pytest.fixture
def nccl(fake: FakeNccl) -> NcclLibrary:
    return NcclLibrary(fake, "/fake/libnccl.so.2")


# ---------------------------------------------------------------------------------------------------
# Structs, versions, dtypes
# ---------------------------------------------------------------------------------------------------


def test_unique_id_is_128_bytes_and_round_trips():
    assert ctypes.sizeof(UniqueId) == library.NCCL_UNIQUE_ID_BYTES == 128
    blob = bytes(range(128))
    assert UniqueId.from_bytes(blob).to_bytes() == blob
    assert UniqueId.from_bytes(b"\0" * 127 + b"\x01").to_bytes()[-1] == 1  # NULs inside are kept, not truncated
    with pytest.raises(ValueError, match="128 bytes, got 64"):
        UniqueId.from_bytes(b"x" * 64)


def test_comm_config_is_the_nccl_2_14_layout_of_ncclConfig_t():
    # size_t size; unsigned magic; unsigned version; int blocking (what NCCL 2.14+ reads before defaults)
    assert [(name, getattr(library.CommConfig, name).offset) for name, _ in library.CommConfig._fields_] == [
        ("size", 0),
        ("magic", 8),
        ("version", 12),
        ("blocking", 16),
    ]
    config = library.CommConfig.make(blocking=False)
    assert (config.size, config.magic, config.version, config.blocking) == (24, 0xCAFEBEEF, 21400, 0)


@pytest.mark.parametrize(("code", "version"), [(2804, (2, 8, 4)), (22105, (2, 21, 5)), (23203, (2, 32, 3))])
def test_version_codes_decode_both_encodings(code, version):
    assert library.decode_version(code) == version


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.bfloat16, DataType.BFLOAT16),
        (torch.float16, DataType.FLOAT16),
        (torch.float32, DataType.FLOAT32),
        (torch.float64, DataType.FLOAT64),
        (torch.int32, DataType.INT32),
        (torch.int64, DataType.INT64),
        (torch.int8, DataType.INT8),
        (torch.uint8, DataType.UINT8),
    ],
)
def test_torch_dtypes_map_to_their_nccl_types(dtype, expected):
    assert nccl_dtype(dtype) is expected
    assert int(expected) == {"BFLOAT16": 9, "FLOAT16": 6, "FLOAT32": 7, "FLOAT64": 8, "INT32": 2, "INT64": 4,
                             "INT8": 0, "UINT8": 1}[expected.name]  # fmt: skip


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8 dtypes")
def test_float8_needs_nccl_2_24():
    assert nccl_dtype(torch.float8_e4m3fn, (2, 24, 3)) is DataType.FLOAT8_E4M3 == 10
    assert nccl_dtype(torch.float8_e5m2, (2, 27, 0)) is DataType.FLOAT8_E5M2 == 11
    with pytest.raises(TypeError, match=r"needs NCCL 2\.24\.0 or newer, this libnccl is 2\.21\.5"):
        nccl_dtype(torch.float8_e4m3fn, (2, 21, 5))


def test_dtypes_nccl_cannot_carry_are_refused_by_name():
    with pytest.raises(TypeError, match=r"NCCL has no data type for torch\.bool; supported: .*bfloat16"):
        nccl_dtype(torch.bool)


def test_tensor_buffer_describes_elements_not_bytes():
    tensor = torch.zeros(6, 4, dtype=torch.bfloat16)
    buffer = library.tensor_buffer(tensor)
    assert buffer == DeviceBuffer(tensor.data_ptr(), 24, DataType.BFLOAT16)
    with pytest.raises(ValueError, match="contiguous"):
        library.tensor_buffer(tensor.t())


# ---------------------------------------------------------------------------------------------------
# The library object: binding, error codes
# ---------------------------------------------------------------------------------------------------


def test_binding_sets_ctypes_signatures_and_reads_the_version(fake, nccl):
    assert nccl.version == (2, 21, 5)
    assert fake.ncclSend.argtypes[1] is ctypes.c_size_t  # count is size_t, not int: >2 GiB buffers
    assert fake.ncclCommInitRank.argtypes[2] is UniqueId  # the id goes by value, all 128 bytes
    assert fake.ncclGetErrorString.restype is ctypes.c_char_p


def test_error_codes_raise_nccl_error_with_ncclGetErrorString_text(fake, nccl):
    fake.results["ncclGroupEnd"] = 6
    with pytest.raises(NcclError) as caught:
        nccl.group_end()
    assert caught.value.code == 6 and caught.value.function == "ncclGroupEnd"
    expected = "ncclGroupEnd failed: remote process exited or there was a network error [ncclRemoteError]"
    assert str(caught.value) == expected
    assert isinstance(caught.value, AfdError)


def test_in_progress_is_an_error_except_where_non_blocking_calls_allow_it(fake, nccl):
    fake.results["ncclGroupEnd"] = IN_PROGRESS
    assert nccl.group_end() == IN_PROGRESS
    fake.results["ncclGetUniqueId"] = IN_PROGRESS
    with pytest.raises(NcclError, match=r"ncclGetUniqueId failed: NCCL operation in progress \[ncclInProgress\]"):
        nccl.get_unique_id()


def test_unknown_result_codes_still_make_a_readable_error(nccl):
    with pytest.raises(NcclError, match=r"ncclSend failed: unknown result code \[result 42\]"):
        nccl.check(42, "ncclSend")


def test_non_blocking_init_passes_the_id_by_value_and_a_non_blocking_config(fake, nccl):
    unique_id = nccl.get_unique_id()
    assert unique_id == bytes(range(128))
    handle = nccl.comm_init_rank(2, unique_id, 1, blocking=False)
    assert handle == 0x1001
    assert fake.calls[-1] == ("ncclCommInitRankConfig", 2, unique_id, 1)
    assert fake.config == {"size": 24, "magic": 0xCAFEBEEF, "version": 21400, "blocking": 0}
    assert nccl.comm_init_rank(2, unique_id, 0, blocking=True) == 0x1000
    assert fake.calls[-1] == ("ncclCommInitRank", 2, unique_id, 0)


def test_a_failed_non_blocking_init_aborts_the_half_made_communicator(fake, nccl):
    fake.results["ncclCommInitRankConfig"] = 4
    with pytest.raises(NcclError, match="ncclCommInitRankConfig failed: invalid argument"):
        nccl.comm_init_rank(2, bytes(128), 0, blocking=False)
    assert fake.calls[-1] == ("ncclCommAbort", 0x1000)


def test_a_library_lacking_a_function_is_unusable_and_says_which():
    with pytest.raises(
        NcclUnavailableError, match=r"/x/libnccl\.so\.2 is not a usable libnccl: it lacks ncclCommAbort"
    ):
        NcclLibrary(FakeNccl(omit=("ncclCommAbort",)), "/x/libnccl.so.2")
    assert NcclLibrary(FakeNccl(omit=("ncclGetLastError",)), "/y").last_error(None) == ""  # optional


def test_too_old_nccl_is_refused_with_the_version_needed():
    with pytest.raises(NcclUnavailableError, match=r"is NCCL 2\.17\.1; AFD needs NCCL 2\.18\.0 or newer.*afd\[gpu\]"):
        NcclLibrary(FakeNccl(version=21701), "/old/libnccl.so.2")


# ---------------------------------------------------------------------------------------------------
# Finding libnccl
# ---------------------------------------------------------------------------------------------------


def _forget_nvidia_modules() -> dict[str, Any]:
    gone = {name: module for name, module in sys.modules.items() if name == "nvidia" or name.startswith("nvidia.")}
    for name in gone:
        del sys.modules[name]
    return gone


@pytest.fixture
def wheel_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake site-packages holding an nvidia-nccl wheel's layout, first on sys.path."""
    lib = tmp_path / "site" / "nvidia" / "nccl" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnccl.so.2").write_bytes(b"not really a library")
    real = _forget_nvidia_modules()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield lib / "libnccl.so.2"
    _forget_nvidia_modules()  # the fake `nvidia` namespace must not outlive the test
    sys.modules.update(real)


def test_discovery_order_is_wheel_then_system_then_soname(wheel_site, monkeypatch):
    monkeypatch.setattr(library.ctypes.util, "find_library", lambda name: "/usr/lib/fake/libnccl.so.2")
    candidates = library.library_candidates()
    assert candidates[0] == str(wheel_site)
    assert candidates[-2:] == ["/usr/lib/fake/libnccl.so.2", "libnccl.so.2"]
    # A real nvidia-nccl wheel on this machine joins the `nvidia` namespace: it comes with the wheels.
    assert all(path.endswith("nvidia/nccl/lib/libnccl.so.2") for path in candidates[:-2])


def test_discovery_without_wheel_or_system_copy_leaves_the_soname(monkeypatch):
    monkeypatch.setattr(library, "wheel_library_dirs", lambda: [Path("/nonexistent/nvidia/nccl/lib")])
    monkeypatch.setattr(library.ctypes.util, "find_library", lambda name: None)
    assert library.library_candidates() == ["libnccl.so.2"]


def test_an_explicit_path_is_the_only_candidate(wheel_site, monkeypatch):
    monkeypatch.setattr(library.ctypes.util, "find_library", lambda name: "/usr/lib/fake/libnccl.so.2")
    assert library.library_candidates("/opt/nccl/lib/libnccl.so.2") == ["/opt/nccl/lib/libnccl.so.2"]
    assert library.library_candidates(Path("/opt/x.so")) == ["/opt/x.so"]


def test_loading_takes_the_first_candidate_that_opens_and_caches_it(wheel_site, monkeypatch):
    candidates = [str(wheel_site), "/usr/lib/fake/libnccl.so.2", "libnccl.so.2"]
    monkeypatch.setattr(library, "library_candidates", lambda path=None: candidates)
    monkeypatch.setattr(library, "_LOADED", {})
    tried = []

    def open_shared_object(path: str) -> FakeNccl:
        tried.append(path)
        if path == str(wheel_site):
            raise OSError(f"{path}: invalid ELF header")
        return FakeNccl()

    monkeypatch.setattr(library, "_open_shared_object", open_shared_object)
    loaded = library.load_library()
    assert loaded.path == "/usr/lib/fake/libnccl.so.2"
    assert tried == [str(wheel_site), "/usr/lib/fake/libnccl.so.2"]
    assert library.load_library() is loaded and len(tried) == 2


def test_no_usable_libnccl_lists_every_attempt_and_how_to_install(wheel_site, monkeypatch):
    monkeypatch.setattr(library, "library_candidates", lambda path=None: [str(wheel_site), "libnccl.so.2"])
    monkeypatch.setattr(library, "_LOADED", {})
    versions = iter([FakeNccl(version=21603)])

    def open_shared_object(path: str) -> FakeNccl:
        if path == "libnccl.so.2":
            return next(versions)
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(library, "_open_shared_object", open_shared_object)
    with pytest.raises(NcclUnavailableError) as caught:
        library.load_library()
    message = str(caught.value)
    assert f"{wheel_site}: {wheel_site}: cannot open shared object file" in message
    assert "libnccl.so.2 is NCCL 2.16.3; AFD needs NCCL 2.18.0" in message
    assert "pip install 'afd[gpu]'" in message and "nvidia-nccl-cu12" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_cuda_the_channel_says_what_is_missing_and_how_to_get_it():
    reason = library.unavailable_reason()
    assert reason is not None and "torch.cuda.is_available() is False" in reason and "CUDA machine" in reason
    with pytest.raises(NcclUnavailableError, match=r"need an NVIDIA GPU, but torch\.cuda\.is_available\(\) is False"):
        NcclChannel("ffn-0", bytes(PAIR_ID_BYTES), 0)
    with pytest.raises(NcclUnavailableError, match="NVIDIA GPU"):
        NcclChannel.loopback()


def test_with_cuda_but_no_libnccl_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(library, "_LOADED", {})
    monkeypatch.setattr(library, "library_candidates", lambda path=None: ["libnccl.so.2"])
    monkeypatch.setattr(library, "_open_shared_object", lambda path: (_ for _ in ()).throw(OSError("not found")))
    with pytest.raises(NcclUnavailableError, match=r"no usable libnccl found \(libnccl.so.2: not found\).*afd\[gpu\]"):
        NcclChannel.create_unique_id()
    assert "afd[gpu]" in (library.unavailable_reason() or "")


def test_the_real_libnccl_when_one_is_installed():
    try:
        real = library.load_library()
    except NcclUnavailableError as exc:
        pytest.skip(f"no libnccl here: {exc}")
    assert real.version >= library.MIN_VERSION
    first, second = real.get_unique_id(), real.get_unique_id()
    assert len(first) == 128 and first != second
    assert "remote process exited" in real.error_string(6)


# ---------------------------------------------------------------------------------------------------
# Non-blocking communicators and deadlines
# ---------------------------------------------------------------------------------------------------


def test_poll_until_returns_at_the_deadline_and_on_stop():
    started = time.monotonic()
    assert poll_until(lambda: False, started + 0.2) is False
    assert 0.2 <= time.monotonic() - started < 1.0
    calls = []
    assert poll_until(lambda: calls.append(1) or len(calls) == 100, time.monotonic() + 5) is True
    started = time.monotonic()
    assert poll_until(lambda: False, started + 30, stop=lambda: time.monotonic() - started > 0.05) is False
    assert time.monotonic() - started < 1.0


def test_communicator_waits_until_formed(fake, nccl):
    comm = Communicator.begin(nccl, bytes(128), rank=0, nranks=2)
    fake.states = [IN_PROGRESS, IN_PROGRESS, 0]
    assert comm.wait_ready(time.monotonic() + 5) is True
    assert [c[0] for c in fake.calls].count("ncclCommGetAsyncError") == 3


def test_a_peer_that_never_joins_times_out_and_abort_frees_the_communicator_once(fake, nccl):
    comm = Communicator.begin(nccl, bytes(128), rank=1, nranks=2)
    fake.states = [IN_PROGRESS]
    started = time.monotonic()
    assert comm.wait_ready(started + 0.1) is False
    assert time.monotonic() - started < 1.0
    comm.abort()
    comm.abort()
    assert [c for c in fake.calls if c[0] == "ncclCommAbort"] == [("ncclCommAbort", 0x1001)]
    with pytest.raises(NcclError, match="aborted"):
        comm.ready()


def test_a_communicator_that_failed_reports_nccl_error(fake, nccl):
    comm = Communicator(nccl, 0x2000, rank=0, nranks=2)
    fake.states = [6]
    with pytest.raises(NcclError, match=r"remote process exited.*\[ncclRemoteError\]"):
        comm.wait_ready(time.monotonic() + 5)


def test_post_issues_one_group_of_sends_then_receives(fake, nccl):
    comm = Communicator(nccl, 0x2000, rank=0, nranks=2)
    sends = [DeviceBuffer(0xA000, 4096, DataType.UINT8), DeviceBuffer(0xB000, 10, DataType.BFLOAT16)]
    comm.post(sends, [DeviceBuffer(0xC000, 7, DataType.UINT8)], peer=1, stream=0x77)
    assert fake.calls == [
        ("ncclGetVersion",),
        ("ncclGroupStart",),
        ("ncclSend", 0xA000, 4096, 1, 1, 0x2000, 0x77),
        ("ncclSend", 0xB000, 10, 9, 1, 0x2000, 0x77),
        ("ncclRecv", 0xC000, 7, 1, 1, 0x2000, 0x77),
        ("ncclGroupEnd",),
    ]


def test_a_failed_send_still_closes_the_group(fake, nccl):
    comm = Communicator(nccl, 0x2000, rank=0, nranks=2)
    fake.results["ncclSend"] = 5
    with pytest.raises(NcclError, match="ncclSend failed: invalid usage"):
        comm.post([DeviceBuffer(0xA000, 1, DataType.UINT8)], [], peer=1, stream=0)
    assert fake.calls[-1] == ("ncclGroupEnd",)  # else this thread's next NCCL call would join the broken group


# ---------------------------------------------------------------------------------------------------
# Envelopes, rendezvous, options
# ---------------------------------------------------------------------------------------------------


def test_first_message_carries_the_header_when_it_fits():
    packed = pack_first_message(EnvelopeKind.FRAME, b"header-bytes", [4096, 0, 12])
    assert len(packed) <= ENVELOPE_BYTES
    first = parse_first_message(packed + bytes(ENVELOPE_BYTES - len(packed)), max_message_bytes=1 << 20)
    assert first.envelope == (EnvelopeKind.FRAME, 12, [4096, 0, 12], 0)
    assert first.header == b"header-bytes"


def test_a_header_too_long_for_the_first_message_travels_separately():
    header = b"h" * (HEADER_ROOM + 1)
    packed = pack_first_message(EnvelopeKind.FRAME, header, [8])
    assert len(packed) == FIELDS.size
    first = parse_first_message(packed, max_message_bytes=1 << 20)
    assert first.header is None and first.envelope.header_length == HEADER_ROOM + 1
    assert parse_first_message(pack_first_message(EnvelopeKind.CLOSE, b"", []), 1).envelope.kind == EnvelopeKind.CLOSE


def test_a_first_message_cut_inside_its_header_is_refused():
    with pytest.raises(MalformedEnvelope, match="cut short inside its header"):
        parse_first_message(pack_envelope(EnvelopeKind.FRAME, 100, []), max_message_bytes=1 << 20)


def test_rendezvous_carries_the_pair_id():
    pair_id = bytes(range(128)) + bytes(range(128, 256))
    assert len(pair_id) == PAIR_ID_BYTES
    assert check_nccl_rendezvous(nccl_rendezvous(pair_id)) == pair_id


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (nccl_rendezvous(bytes(128)), "128-byte id, expected 256"),
        (pack_rendezvous("nccl", {"unique_id": "zz" * 256}), "not hex"),
        (pack_rendezvous("gloo", {"unique_id": "00" * 256}), "not 'nccl'"),
        (msgpack.packb({"backend": "nccl", "unique_id": 5}), "must be str"),
        (b"\xc1", "not valid msgpack"),
    ],
)
def test_malformed_rendezvous_is_refused(data, match):
    with pytest.raises(RendezvousError, match=match):
        check_nccl_rendezvous(data)


@pytest.mark.parametrize(
    "fields",
    [{"connect_timeout": 0}, {"io_timeout": -1}, {"close_grace": -0.1}, {"max_pending_frames": 0}],
)
def test_options_are_validated(fields):
    with pytest.raises(ConfigError, match="NcclOptions"):
        NcclOptions(**fields)


def test_channel_arguments_are_checked_before_touching_cuda():
    with pytest.raises(ConfigError, match="pair id is 256 bytes, got 128"):
        NcclChannel("ffn-0", bytes(128), 0)
    with pytest.raises(ConfigError, match="rank must be 0"):
        NcclChannel("ffn-0", bytes(PAIR_ID_BYTES), 2)
    assert nccl_channel.PAIR_ID_BYTES == 2 * library.NCCL_UNIQUE_ID_BYTES


# ---------------------------------------------------------------------------------------------------
# The self test's own frames (its peer process reads them from the network)
# ---------------------------------------------------------------------------------------------------


def test_selftest_headers_round_trip_and_refuse_garbage():
    op, specs = read_header(make_header("echo", [torch.zeros(3, 5, dtype=torch.bfloat16)]))
    assert op == "echo" and [(s.shape, s.dtype) for s in specs] == [((3, 5), torch.bfloat16)]
    for bad in (
        msgpack.packb({"op": "rm -rf", "tensors": []}),
        msgpack.packb({"op": "echo", "tensors": [["complex128", [1]]]}),
        msgpack.packb({"op": "echo", "tensors": [["float32", [-1]]]}),
        msgpack.packb({"op": "echo", "tensors": [["float32", [1 << 20, 1 << 20]]]}),
        msgpack.packb([1, 2]),
    ):
        with pytest.raises(ValueError, match="self-test header"):
            read_header(bad)
    assert _sizes("4K,1M,64MiB,100") == [4096, 1 << 20, 64 << 20, 100]
