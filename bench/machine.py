"""What a run ran on: cores, CPU model, memory, versions, date, commit."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

__all__ = ["cpu_ticks", "load_note", "machine_info"]

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grpcio", "protobuf", "onnxruntime", "numpy")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
    return found.group(1).strip() if found else platform.processor() or "unknown"


def _memory() -> str:
    try:
        found = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return "unknown"
    return f"{int(found.group(1)) / 2**20:.1f} GiB" if found else "unknown"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty.strip() else "")


def machine_info() -> dict[str, str]:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "cpu": _cpu_model(),
        "cores": f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()}",
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far, /proc/stat's first line (user nice system idle iowait irq
    softirq steal ...), in clock ticks."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def load_note(before: list[int]) -> dict[str, str]:
    """How busy the machine was over a run: the load average now, and the share of CPU time the
    hypervisor took (steal) since ``before``."""
    after = cpu_ticks()
    note = {}
    with contextlib.suppress(OSError):
        note["load average (1, 5, 15 min) at the end"] = ", ".join(
            Path("/proc/loadavg").read_text().split()[:3])
    if before and len(after) == len(before) and len(after) > 7:
        delta = [a - b for a, b in zip(after, before, strict=True)]
        note["CPU stolen by the hypervisor over the run"] = f"{delta[7] / sum(delta):.1%}"
    return note
