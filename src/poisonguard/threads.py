"""A sane default for torch's CPU threads: the CPUs this process may use, read from the
cgroup CPU quota where one is set (containers often show every host core to ``os.cpu_count``
while allowing two), else the CPU affinity; ``OMP_NUM_THREADS`` wins when set."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cpus() -> int:
    """CPUs this process may run on: the cgroup v2 quota (``cpu.max``) or the affinity."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads() -> int | None:
    """The thread count to set, or None to leave torch alone (``OMP_NUM_THREADS`` is set)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return available_cpus()


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: :func:`default_threads`); return the
    count in force."""
    import torch

    from poisonguard.errors import ConfigError

    if n is not None and n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    n = n if n is not None else default_threads()
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
