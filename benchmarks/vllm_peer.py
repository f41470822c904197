"""vLLM's CPU build as a peer in `afd bench engine --peer vllm`: its offline engine in its own process.

vLLM is never a dependency of this project: it runs from another virtualenv's interpreter
(`--peer-python`, or `AFD_VLLM_PYTHON`), through benchmarks/vllm_peer_worker.py, which loads the model once
and answers one JSON line per generate call. The benchmark alternates it with the AFD engine and
transformers on the same prompts. vLLM's threads are bound to the cores this process may use
(`VLLM_CPU_OMP_THREADS_BIND`), and with `preload` it gets tcmalloc and its venv's Intel OpenMP, as its own
start-up warning asks, for its best figure. Setting up that venv is in benchmarks/README.md.

Between its own runs the peer is stopped (SIGSTOP to its process group, SIGCONT before its next generate): an
idle vLLM is not idle, its engine-core and worker processes poll and kept about a fifth of a core busy here,
which slowed the other sides' runs (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

WORKER = Path(__file__).with_name("vllm_peer_worker.py")
PYTHON_ENV = "AFD_VLLM_PYTHON"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
START_TIMEOUT_S = 900.0
"""vLLM's start on 2 cores: model load, KV cache set-up and its warm-up took about a minute here."""
GENERATE_TIMEOUT_S = 1800.0
GUARD = """
import os, signal, sys
sys.stdin.buffer.read()  # returns at end of file: the benchmark closed the pipe, or died
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except ProcessLookupError:
    pass
"""
"""Run beside the peer, outside its process group: when the benchmark dies (any signal, SIGKILL included) the pipe
closes and the guard kills the whole group. Nothing inside the group can: it is stopped between runs, and when its
leader (the worker) was killed here, vLLM's stopped engine-core processes got no SIGHUP / SIGCONT and stayed."""


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message is the one-line reason the benchmark prints."""


def resolve_python(python: str | None) -> Path:
    """The vLLM venv's interpreter, checked to exist and to import vllm."""
    chosen = python or os.environ.get(PYTHON_ENV)
    if not chosen:
        raise PeerUnavailable(f"no vLLM interpreter: pass --peer-python PATH or set {PYTHON_ENV}")
    path = Path(chosen)
    if not path.is_file():
        raise PeerUnavailable(f"--peer-python {path} does not exist")
    probe = subprocess.run(
        [str(path), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"{path} cannot import vllm ({last})")
    return path


def _preload(python: Path) -> str:
    venv = python.parent.parent
    libraries = [TCMALLOC, *sorted(venv.glob("lib/libiomp5.so"))]
    return ":".join(str(p) for p in libraries if p.is_file())


class VllmPeer:
    """One vLLM `LLM` on `model_dir`, kept loaded across the benchmark's batches."""

    def __init__(
        self, python: Path, model_dir: Path, dtype: str, max_num_seqs: int, max_model_len: int, preload: bool
    ) -> None:
        cores = sorted(os.sched_getaffinity(0))
        env = os.environ | {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}"),
            "HF_HUB_OFFLINE": "1",
        }
        self.preloaded = _preload(python) if preload else ""
        if self.preloaded:
            env["LD_PRELOAD"] = self.preloaded
        self.version = ""
        self.log_path = model_dir.parent / "vllm-peer.log"
        self._log = self.log_path.open("w")
        self._process = subprocess.Popen(
            [str(python), str(WORKER), str(model_dir), dtype, str(max_num_seqs), str(max_model_len)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=model_dir.parent,
            start_new_session=True,  # its own process group, so that pausing reaches vLLM's engine-core processes
        )
        self._guard = subprocess.Popen(
            [sys.executable, "-c", GUARD, str(self._process.pid)], stdin=subprocess.PIPE, start_new_session=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self._process.stdout is not None
        threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True).start()
        try:
            ready = self._reply(START_TIMEOUT_S)
        except PeerUnavailable:
            self.close()
            raise
        self.version = str(ready.get("version", ""))
        self._pause()

    def _pause(self) -> None:
        """Stop the peer's group and wait (up to a second) until the worker is stopped: signals are delivered
        asynchronously, and the next side's timed run must not start beside a still running peer."""
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while self.state() not in ("T", "") and time.monotonic() < deadline:
            time.sleep(0.001)

    def _signal(self, sig: signal.Signals) -> None:
        """`sig` to the worker and every process vLLM started under it (one process group)."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited between the poll and the signal
                os.killpg(self._process.pid, sig)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise PeerUnavailable(f"vLLM gave no answer in {timeout:.0f} s (log: {self.log_path})") from None
        if line is None:
            raise PeerUnavailable(f"vLLM exited with {self._process.wait()} (log: {self.log_path})")
        return json.loads(line)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, list[int]]:
        """Seconds for one greedy `LLM.generate` of `prompts`, tokens made, and the first prompt's tokens."""
        assert self._process.stdin is not None
        self._signal(signal.SIGCONT)
        try:
            self._process.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
            self._process.stdin.flush()
            reply = self._reply(GENERATE_TIMEOUT_S)
        finally:
            self._pause()
        return float(reply["seconds"]), int(reply["tokens"]), list(reply["first_output"])

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        if self._process.poll() is None:
            if self._process.stdin is not None:
                self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._process.wait(timeout=30)
        if self._guard.stdin is not None:
            self._guard.stdin.close()  # the guard kills what is left of the group (nothing, after a clean exit)
        self._guard.wait(timeout=30)
        self._log.close()

    def state(self) -> str:
        """The worker's scheduler state from /proc ("T" while paused between runs), "" once it has exited."""
        try:
            stat = Path(f"/proc/{self._process.pid}/stat").read_text()
        except OSError:
            return ""
        return stat.rsplit(")", 1)[1].split()[0]
