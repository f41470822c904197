"""Skip reasons and leftover checks for tests that build the mix testbed on this host (root, cgroup v1, netns)."""

from __future__ import annotations

import shutil
import subprocess
import time

from orchestration.testbed import RunTag, TestbedError, cgroup_preflight, leftovers


def why_no_testbed() -> str | None:
    """Why the testbed cannot be built here, or None when it can (root, cgroup v1 cpu, ip netns, tc)."""
    try:
        cgroup_preflight()
    except TestbedError as error:
        return str(error)
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{RunTag.mine().tag}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def wait_for_no_leftovers(tag: RunTag | None = None, timeout_s: float = 10.0) -> list[str]:
    """Testbed resources (of `tag`, or of any run) still present once `timeout_s` has passed; the kernel
    removes a deleted namespace's veth peer asynchronously, so this polls instead of looking once."""
    deadline = time.monotonic() + timeout_s
    while (found := leftovers(tag=tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found
