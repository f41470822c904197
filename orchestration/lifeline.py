"""Node processes never outlive the launcher that started them, and can be stopped without it.

A lifeline: the local launcher (`afd up`) holds the write end of a pipe whose read end every node
process it starts inherits (its number in AFD_LAUNCHER_FD). Nothing is ever written; a watchdog thread
in the node (`watch_launcher`) blocks on a read that returns only when the last write end closes, which
the kernel does when the launcher exits however it exits: kill -9, the OOM killer, a CI timeout, a
closed terminal. The node then stops itself as on SIGTERM, and hard-exits if that takes too long.

Why not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that forked the child ends, and `afd scale`
spawns nodes from a short-lived request thread of the launcher's control server; a preexec_fn is also
unsafe in a threaded parent. Why not the process group: nodes get sessions of their own so a Ctrl-C
in the launcher's terminal reaches only the launcher, which then stops them in order (nodes, router).

Process records: the launcher writes the pid and kernel start time of every process it started (and
its own) to `processes.json` in its work directory, so `afd down` can stop a cluster whose launcher
no longer answers (`stop_recorded`). A pid is acted on only while its start time still matches: after
a process exits its pid can be reused by an unrelated process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("afd.lifeline")

LAUNCHER_FD_ENV = "AFD_LAUNCHER_FD"
"""Environment variable holding the number of the inherited read end of the launcher's pipe."""
LAUNCHER_GONE_GRACE_S = 5.0
"""After the launcher is gone, how long a node's own shutdown (SIGTERM path) may take before it hard-exits."""
RECORDS_FILE = "processes.json"
"""Name of the process records in a launcher's work directory."""


# ---------------------------------------------------------------------------------------------------
# In the node process
# ---------------------------------------------------------------------------------------------------


def watch_launcher(grace_s: float = LAUNCHER_GONE_GRACE_S) -> threading.Thread | None:
    """If this process was started by a launcher (AFD_LAUNCHER_FD set), a daemon thread that ends the
    process once the launcher is gone: SIGTERM to itself, then `os._exit(3)` after `grace_s` seconds.

    Returns the thread, or None when not started by a launcher. The variable is removed from the
    environment so processes this one starts do not watch a pipe they do not hold.
    """
    value = os.environ.pop(LAUNCHER_FD_ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {LAUNCHER_FD_ENV}={value!r} is not an open pipe of the launcher: {exc}") from None
    thread = threading.Thread(target=_watch, args=(fd, grace_s), name="launcher-lifeline", daemon=True)
    thread.start()
    return thread


def _watch(fd: int, grace_s: float) -> None:
    while True:
        try:
            if not os.read(fd, 4096):  # EOF: every write end is closed, the launcher is gone
                break
        except InterruptedError:
            continue
        except OSError:
            break
    log.error("the launcher that started this node is gone; stopping (hard exit in %.0f s)", grace_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)  # the SIGTERM path has had its chance; nothing left to wait on but the clock
    log.error("still running %.0f s after the launcher went away; exiting now", grace_s)
    logging.shutdown()
    os._exit(3)


# ---------------------------------------------------------------------------------------------------
# Process identity and records
# ---------------------------------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The kernel start time of `pid` (clock ticks since boot, /proc/PID/stat field 22); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses; everything after its last ")" is plain
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _state_letter(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One process a launcher started (or the launcher itself)."""

    name: str
    """Node id, "router" or "launcher"."""
    pid: int
    """Its pid."""
    start_ticks: int
    """Its kernel start time when recorded (tells it from a later process reusing the pid)."""

    @classmethod
    def of(cls, name: str, pid: int) -> ProcessRecord | None:
        """A record of the running `pid`; None if it is already gone."""
        ticks = start_ticks(pid)
        return None if ticks is None else cls(name, pid, ticks)

    def alive(self) -> bool:
        """Still running (a zombie counts as gone) and still the process recorded."""
        return start_ticks(self.pid) == self.start_ticks and _state_letter(self.pid) not in (None, "Z", "X")

    def signal(self, signum: int) -> None:
        """Send `signum` if the pid is still this process; a process that exits meanwhile is ignored."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)


def write_records(workdir: Path, records: Iterable[ProcessRecord]) -> None:
    """`workdir/processes.json`, replaced atomically (a reader never sees half a file)."""
    path = workdir / RECORDS_FILE
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps([asdict(record) for record in records]))
    os.replace(partial, path)


def read_records(workdir: Path) -> list[ProcessRecord]:
    """The records in `workdir`; empty if there are none. Raises ValueError on a damaged file."""
    path = workdir / RECORDS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read process records {path}: {exc}") from exc
    try:
        return [ProcessRecord(str(r["name"]), int(r["pid"]), int(r["start_ticks"])) for r in raw]
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"damaged process records {path}: {exc}") from exc


def stop_recorded(records: Iterable[ProcessRecord], timeout_s: float = 30.0) -> list[ProcessRecord]:
    """Stop every still-running recorded process: SIGCONT (a stopped one cannot handle SIGTERM) and
    SIGTERM, then SIGKILL whatever is left after `timeout_s`. Returns the records that were running."""
    running = [record for record in records if record.alive()]
    for record in running:
        record.signal(signal.SIGCONT)
        record.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(record.alive() for record in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for record in running:
        record.signal(signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while any(record.alive() for record in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running
