"""What this machine's CPU offers, read from /proc/cpuinfo: the choices that depend on it (bfloat16
training in training/precision.py, the compiled CPU kernels in kernels/xla.py) ask here."""

from __future__ import annotations


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
