"""Resident memory per idle session, measured in a process of its own (the suite runs it as a
subprocess and reads the JSON line it prints).

    python -P bench/memory.py [--sessions 100000] [--model-dir DIR] [--replay-window 64]

Builds the server's engine (sessions, scheduler, state bank, onnxruntime) with the server's
defaults and ``--max-sessions`` = ``--sessions``, then measures VmRSS three times: before any
session, after opening them all (the session table alone: ids, ``Session`` objects, queues), and
after each session took one step through the scheduler (which writes its state rows and its first
replay-ring row), so every session holds state and sits idle.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import sys
from pathlib import Path

import numpy as np

from seqserve.server.engine import Engine
from seqserve.server.model import load_model_spec
from seqserve.server.runtime import Runtime
from seqserve.server.settings import Settings

CHUNK = 4096  # steps in flight at once, so transient futures stay small next to the sessions


def rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def _settled_rss() -> int:
    gc.collect()
    return rss_bytes()


async def measure(sessions: int, model_dir: str, replay_window: int) -> dict[str, object]:
    spec = load_model_spec(model_dir or None)
    settings = Settings(
        max_sessions=sessions, replay_window=replay_window, snapshot_path="", metrics_port=-1
    )
    engine = Engine(spec, Runtime(spec), settings)
    engine.start()
    with np.load(spec.directory / "samples.npz") as data:
        frame = np.ascontiguousarray(data["x"][0, :1], np.float32)
    await engine.step("warm-up", 0, frame, start=True)  # onnxruntime's first-run allocations
    await engine.close("warm-up")
    empty = _settled_rss()
    for _ in range(sessions):
        engine.open()  # server-assigned ids, as OpenSession makes them (32 hex characters)
    opened = _settled_rss()
    table = list(engine.table)
    for lo in range(0, sessions, CHUNK):
        await asyncio.gather(*(engine.submit(s.id, 0, frame) for s in table[lo : lo + CHUNK]))
    del table
    stepped = _settled_rss()
    one = next(iter(engine.table))
    sizes = {
        "session": sys.getsizeof(one),
        "pending_queue": 0 if one.pending is None else sys.getsizeof(one.pending),
        "id": sys.getsizeof(one.id),
    }
    assert all(s.position == 1 for s in engine.table)
    await engine.stop()
    return {
        "sessions": sessions,
        "rss_empty": empty,
        "rss_opened": opened,
        "rss_stepped": stepped,
        "state_bytes": engine.bank.bytes_per_slot,
        "ring_bytes": replay_window * spec.classes * 4,
        "replay_window": replay_window,
        "object_sizes": sizes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--replay-window", type=int, default=Settings().replay_window)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.sessions, args.model_dir, args.replay_window))))


if __name__ == "__main__":
    main()
