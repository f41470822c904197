"""Process records: a pid is acted on only while it is still the process recorded (pids are reused)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.lifeline import ProcessRecord, read_records, start_ticks, stop_recorded, write_records


def test_records_round_trip_and_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    me = ProcessRecord.of("launcher", os.getpid())
    assert me is not None and me.alive() and me.start_ticks == start_ticks(os.getpid())
    write_records(tmp_path, [me])
    assert read_records(tmp_path) == [me]
    impostor = ProcessRecord("router", os.getpid(), me.start_ticks + 1)  # same pid, another process
    assert not impostor.alive()
    impostor.signal(signal.SIGTERM)  # must not reach this process
    assert stop_recorded([impostor], timeout_s=0.1) == []
    assert read_records(tmp_path / "missing") == []


def test_damaged_records_are_reported(tmp_path: Path) -> None:
    (tmp_path / "processes.json").write_text('[{"name": "x"}]')
    with pytest.raises(ValueError, match="damaged"):
        read_records(tmp_path)


def test_stop_recorded_stops_a_stopped_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.send_signal(signal.SIGSTOP)
        record = ProcessRecord.of("ffn-0", child.pid)
        assert record is not None
        assert stop_recorded([record], timeout_s=10) == [record]
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
