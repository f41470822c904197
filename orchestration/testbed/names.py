"""Names of the testbed's resources: every one carries its run's tag, and the tag names its owner process.

A tag is `afdm<pid in hex>x`: short enough that `<tag><index>h` fits a Linux interface name (15 bytes), and
it tells a later run whether the owner is still alive (a stale tag's resources may be removed; a live one's
belong to a benchmark that is running, perhaps another user's, and are left alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GLOBAL_PREFIX = "afdm"
"""Every testbed resource's name starts with this."""


@dataclass(frozen=True, slots=True)
class RunTag:
    """The tag of one run (one process): `afdm<pid hex>x`."""

    owner_pid: int
    """Process that owns the resources."""

    @classmethod
    def mine(cls) -> RunTag:
        return cls(os.getpid())

    @property
    def tag(self) -> str:
        return f"{GLOBAL_PREFIX}{self.owner_pid:x}x"

    @classmethod
    def parse(cls, name: str) -> RunTag | None:
        """The tag a resource name starts with, or None when the name is not a testbed name."""
        if not name.startswith(GLOBAL_PREFIX) or "x" not in name[len(GLOBAL_PREFIX) :]:
            return None
        digits = name[len(GLOBAL_PREFIX) : name.index("x", len(GLOBAL_PREFIX))]
        try:
            return cls(int(digits, 16)) if digits else None
        except ValueError:
            return None

    def owns(self, name: str) -> bool:
        return name.startswith(self.tag)

    def alive(self) -> bool:
        """Whether the owner process still runs."""
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return True
