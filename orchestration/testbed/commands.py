"""How the testbed runs `ip` and `tc`: one small interface, so tests can record the commands instead."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

from afd.errors import AfdError


class TestbedError(AfdError):
    """The testbed cannot be built here (no root, no cgroup v1 cpu controller, no netns/tc) or a step failed."""

    __test__ = False  # not a pytest test class despite its name


class CommandRunner(Protocol):
    """Runs one command; returns its stdout. `check`: raise TestbedError when it fails."""

    def __call__(self, argv: Sequence[str], check: bool = True) -> str: ...


class SystemRunner:
    """Runs commands for real (bounded: a network command that hangs is an error, not a hung benchmark)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    def __call__(self, argv: Sequence[str], check: bool = True) -> str:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise TestbedError(f"`{argv[0]}` is not installed (the mix testbed needs iproute2: ip and tc)") from None
        except subprocess.TimeoutExpired:
            raise TestbedError(f"`{' '.join(argv)}` did not finish within {self.timeout_s:.0f} s") from None
        if check and done.returncode != 0:
            raise TestbedError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout
