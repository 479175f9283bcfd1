"""Where the server's time goes under one benchmark load: seqserve runs under ``py-spy record``
while the suite's client drives it, then the samples are summed by thread, by function (self) and
by function (inclusive). Needs ``seqserve[bench]`` (py-spy).

    python -P bench/profile.py stream 1 [--seconds 10] [--native] [--out bench/results/profiles]
    python -P bench/profile.py stream 128 | mux 256 | predict 1024 | window 1

The raw samples (py-spy's collapsed stacks, one thread per root) are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/profile.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.clients import (
    Frames,
    predict_caller,
    stream_batches,
    stream_sessions,
    window_predicts,
)
from bench.servers import BENCH, ROOT, Server, seqserve_server

# Frames of the server starting (imports, model load) or stopping: not the load being profiled.
_STARTUP = ("_find_and_load ", "create_server ", "stop (")
_LINE = re.compile(r" \(([^()]*?)(:\d+)?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: lines of one function add up."""
    found = _LINE.search(frame)
    if not found:
        return frame
    return f"{frame[: found.start()]} ({Path(found.group(1)).name})"


def summarize(raw: Path, top: int) -> str:
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = skipped = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if any(f.startswith(_STARTUP) for f in frames):
            skipped += n
            continue
        total += n
        threads[frames[0]] += n
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames[1:]}:
            inclusive[frame] += n
    out = [
        f"{total} samples under load ({skipped} of start-up and shutdown left out)",
        "",
        "| thread | share |",
        "| --- | ---: |",
    ]
    out += [f"| {t} | {n / total:.1%} |" for t, n in threads.most_common(8)]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        out += ["", f"| function ({title}) | share |", "| --- | ---: |"]
        out += [f"| `{f}` | {n / total:.1%} |" for f, n in counter.most_common(top)]
    return "\n".join(out)


async def drive(server: Server, scenario: str, load: int, seconds: float) -> str:
    with np.load(ROOT / "models" / "basicmotions" / "samples.npz") as data:
        frames = Frames(data["x"])
    if scenario == "stream":
        run = await stream_sessions(
            server, frames, load, warmup=1.0, seconds=seconds, tag="profile"
        )
    elif scenario == "mux":
        run = await stream_batches(
            server, frames, load, streams=4, depth=2, warmup=1.0, seconds=seconds, tag="profile"
        )
    elif scenario == "window":
        run = await window_predicts(server, frames, load, 100, warmup=1.0, seconds=seconds)
    else:
        x = np.concatenate([frames.x] * -(-load // len(frames.x)))[:load]
        async with predict_caller(server, x) as call:
            times = [await call() for _ in range(max(2, int(seconds)))]
        return f"Predict of {load} x {x.shape[1]} steps: {min(times) * 1e3:.0f} ms best"
    return (
        f"{run.steps / run.seconds:,.0f} steps/s, p50 {run.p50:.3f} ms, p99 {run.p99:.3f} "
        f"ms, server {run.server_cpu:.2f} cores"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("stream", "mux", "predict", "window"))
    parser.add_argument(
        "load", type=int, help="sessions, sessions per message, sequences or clients"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--native", action="store_true", help="C frames too (grpc, numpy)")
    parser.add_argument("--gil", action="store_true", help="only threads holding the GIL")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "profiles")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    flags = [f for f in ("native", "gil") if getattr(args, f)]
    raw = args.out / ("-".join([args.scenario, str(args.load), *flags]) + ".txt")
    wrap = [
        spy,
        "record",
        "--format",
        "raw",
        "--threads",
        "--rate",
        str(args.rate),
        "--output",
        str(raw),
        *(f"--{f}" for f in flags),
        "--",
    ]
    async with seqserve_server(ROOT / "models" / "basicmotions", wrap=wrap) as server:
        result = await drive(server, args.scenario, args.load, args.seconds)
    print(f"## seqserve under {args.scenario} {args.load}: {result}\n")
    print(summarize(raw, args.top))


if __name__ == "__main__":
    asyncio.run(main())
