"""What a run ran on: cores, CPU model, memory, versions, date, commit."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["CpuMark", "load_note", "machine_info"]

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
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout
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


@dataclass(frozen=True, slots=True)
class CpuMark:
    """The machine's CPU time so far (/proc/stat's first line, in clock ticks: user nice system
    idle iowait irq softirq steal ...), this process's and its waited-for children's (seconds),
    and the wall clock."""

    machine: tuple[int, ...]
    own: float
    wall: float

    @classmethod
    def now(cls) -> CpuMark:
        try:
            line = Path("/proc/stat").read_text().split("\n", 1)[0]
            machine = tuple(int(v) for v in line.split()[1:])
        except (OSError, ValueError):
            machine = ()
        t = os.times()
        return cls(
            machine, t.user + t.system + t.children_user + t.children_system, time.monotonic()
        )


def load_note(before: CpuMark) -> dict[str, str]:
    """How busy the machine was over a run (``before`` to now): the CPU that processes outside
    the suite used (the box is shared: other people's builds and tests show up here), the share
    the hypervisor stole, and the load average. Call it once every server has been waited for,
    so their CPU counts as the suite's."""
    after = CpuMark.now()
    note = {}
    if before.machine and len(after.machine) == len(before.machine) > 7:
        delta = [a - b for a, b in zip(after.machine, before.machine, strict=True)]
        busy = (sum(delta[:3]) + sum(delta[5:7])) / os.sysconf("SC_CLK_TCK")
        others = max(0.0, busy - (after.own - before.own)) / (after.wall - before.wall)
        note["CPU used by other processes over the run"] = f"{others:.2f} cores on average"
        note["CPU stolen by the hypervisor over the run"] = f"{delta[7] / sum(delta):.1%}"
    with contextlib.suppress(OSError):
        note["load average (1, 5, 15 min) at the end"] = ", ".join(
            Path("/proc/loadavg").read_text().split()[:3]
        )
    return note
