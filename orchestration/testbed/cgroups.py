"""Per-node CPU limits and CPU time: cgroup v1 `cpu` (CFS quota) and `cpuacct` (usage) groups.

A node's group is `<root>/cpu/<name>` with `cpu.cfs_quota_us = cores * cpu.cfs_period_us` (no quota: -1) and
`<root>/cpuacct/<name>`, whose `cpuacct.usage` counts the nanoseconds of CPU its processes used. Where the
two controllers are mounted together (`cpu,cpuacct`, the usual systemd layout) both paths are one group.
A process joins by writing its pid to each group's `cgroup.procs` before it execs the node (testbed.py), so
every thread torch starts later is inside the limit from its first instruction.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from orchestration.testbed.commands import TestbedError
from orchestration.testbed.names import GLOBAL_PREFIX

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup v1 hierarchies are mounted."""
CFS_PERIOD_US = 100_000
"""CFS period of every node's group (the kernel's and Kubernetes' default, 100 ms)."""
CONTROLLERS = ("cpu", "cpuacct")


def cgroup_preflight(root: Path = CGROUP_ROOT) -> None:
    """Raise TestbedError with the reason when per-node CPU limits cannot be made here."""
    if os.geteuid() != 0:
        raise TestbedError(
            "the mix testbed needs root: it creates cgroups (CPU quotas), network namespaces and veth links "
            "(run as root, e.g. `sudo -E afd bench mix ...`)"
        )
    quota = root / "cpu" / "cpu.cfs_quota_us"
    if not quota.exists():
        if (root / "cgroup.controllers").exists():
            raise TestbedError(
                f"{root} is a cgroup v2 (unified) hierarchy; the mix testbed uses cgroup v1's cpu controller "
                f"({quota} is missing)"
            )
        raise TestbedError(f"no cgroup v1 cpu controller with CFS quota here ({quota} is missing)")
    for controller in CONTROLLERS:
        if not os.access(root / controller, os.W_OK):
            raise TestbedError(f"cannot create cgroups under {root / controller} (not writable)")


@dataclass(frozen=True, slots=True)
class CpuCgroup:
    """One node's cpu + cpuacct group."""

    name: str
    """Group name (starts with the run's tag)."""
    root: Path = CGROUP_ROOT
    """Mount point of the v1 hierarchies."""

    def dirs(self) -> list[Path]:
        """The group's directories, one per distinct hierarchy (co-mounted controllers share one)."""
        seen: dict[Path, Path] = {}
        for controller in CONTROLLERS:
            base = self.root / controller
            if base.exists():
                seen.setdefault(base.resolve(), base / self.name)
        return list(seen.values())

    @property
    def cpu_dir(self) -> Path:
        return self.root / "cpu" / self.name

    def create(self, quota_cores: float | None) -> None:
        """Make the group; `quota_cores` None: no limit (CPU time is still counted)."""
        if quota_cores is not None and quota_cores * CFS_PERIOD_US < 1000:
            raise TestbedError(f"a CPU quota of {quota_cores} cores is below the kernel's minimum of 1 ms per period")
        for path in self.dirs():
            path.mkdir(exist_ok=True)
        quota = -1 if quota_cores is None else round(quota_cores * CFS_PERIOD_US)
        (self.cpu_dir / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (self.cpu_dir / "cpu.cfs_quota_us").write_text(str(quota))

    def procs_files(self) -> list[Path]:
        """Files a process writes its pid to, to join the group."""
        return [path / "cgroup.procs" for path in self.dirs()]

    def usage_ns(self) -> int | None:
        """CPU time of the group's processes so far, ns (None when cpuacct is not mounted)."""
        path = self.root / "cpuacct" / self.name / "cpuacct.usage"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def throttled(self) -> dict[str, int]:
        """cpu.stat: nr_periods, nr_throttled, throttled_time (ns), as the kernel counts them."""
        try:
            lines = (self.cpu_dir / "cpu.stat").read_text().splitlines()
        except OSError:
            return {}
        return {key: int(value) for key, value in (line.split() for line in lines if line.strip())}

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for procs in self.procs_files():
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except (OSError, ValueError):
                continue
        return pids

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kill what still runs in the group (its processes are the testbed's own) and remove it."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                try:
                    for path in self.dirs():
                        with contextlib.suppress(FileNotFoundError):
                            path.rmdir()
                    return
                except OSError as error:  # EBUSY: a process joined after we looked (a node still starting)
                    if time.monotonic() > deadline:
                        raise TestbedError(f"cannot remove cgroup {self.name}: {error.strerror}") from None
            elif time.monotonic() > deadline:
                raise TestbedError(f"cgroup {self.name}: processes {sorted(pids)} did not exit")
            time.sleep(0.05)


def testbed_cgroups(root: Path = CGROUP_ROOT) -> list[str]:
    """Names of every testbed group (any run) under the v1 hierarchies."""
    names: set[str] = set()
    for controller in CONTROLLERS:
        base = root / controller
        try:
            names.update(p.name for p in base.iterdir() if p.is_dir() and p.name.startswith(GLOBAL_PREFIX))
        except OSError:
            continue
    return sorted(names)
