"""What a training run's exact numbers depend on, recorded so that bit-exactness is claimed only
where it holds.

TensorFlow's CPU kernels (oneDNN's, and Eigen's with it off) pick their code paths, and with them
the order of floating-point sums, by the instruction set of the CPU, its cache sizes and the number
of threads. The same seed on the same machine kind and libraries gives the same weights, bit for
bit; on another CPU kind the weights differ in the last bits of every step, and after hundreds of
epochs by up to ~1e-2. So ``train`` records this fingerprint in ``model.json``, and the
reproduction test compares weights exactly only when the fingerprint of the machine running it is
the same; elsewhere it checks what carries across machines (accuracy and predictions).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["ENVIRONMENT", "fingerprint", "same_machine"]

# Environment variables that change which kernels run.
ENVIRONMENT = (
    "TF_ENABLE_ONEDNN_OPTS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
)

# CPU flags (as /proc/cpuinfo spells them) that oneDNN and Eigen dispatch on.
_ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c")


def _cpuinfo() -> tuple[str, str, list[str]]:
    """The CPU's model name, cache size and instruction-set flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor(), "", []
    model, cache, flags = "", "", []
    for line in text.split("\n\n")[0].splitlines():  # the first processor's entry
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key == "cache size":
            cache = value.strip()
        elif key == "flags":
            flags = sorted(f for f in value.split() if f.startswith(_ISA_PREFIXES))
    return model, cache, flags


def fingerprint() -> dict[str, Any]:
    """The machine and libraries a training run ran on, as far as its numbers depend on them."""
    import keras
    import numpy as np
    import tensorflow as tf

    model, cache, flags = _cpuinfo()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    return {
        "machine": platform.machine(),
        "cpu": model,
        "cache": cache,
        "isa": flags,
        "cpus": cpus,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
    }


def same_machine(recorded: dict[str, Any] | None) -> bool:
    """True when this machine and these libraries match a recorded fingerprint exactly."""
    return recorded is not None and recorded == fingerprint()
