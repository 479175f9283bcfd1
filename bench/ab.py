"""Two seqserve servers that differ only in flags, measured in one run with the suite's clients,
alternating round by round so that drift hits both alike; medians.

    python -P bench/ab.py --a="--loop asyncio" --b="--loop uvloop" [--rounds 5] [--seconds 3]

Loads: one session streaming one frame per message, 128 such sessions, and StreamBatch with 256
sessions per message (4 streams, 2 messages in flight each): the suite's P1, P2 and P3 loads.
The cost of a step is the server's CPU time per step (server cores busy ÷ steps/s).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/ab.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.clients import Frames, Run, stream_batches, stream_sessions
from bench.servers import ROOT, Server, seqserve_server

LOADS = (("stream", 1), ("stream", 128), ("mux", 256))


async def _measure(server: Server, frames: Frames, kind: str, load: int, seconds: float) -> Run:
    tag = f"{kind}{load}-{server.port}-{asyncio.get_running_loop().time():.0f}"
    if kind == "stream":
        return await stream_sessions(server, frames, load, warmup=1.0, seconds=seconds, tag=tag)
    return await stream_batches(
        server, frames, load, streams=4, depth=2, warmup=1.0, seconds=seconds, tag=tag
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="", help="flags of server A, one string")
    parser.add_argument("--b", default="", help="flags of server B, one string")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "basicmotions")
    args = parser.parse_args()
    with np.load(args.model_dir / "samples.npz") as data:
        frames = Frames(np.ascontiguousarray(data["x"], np.float32))
    print(f"A: `{args.a}`, B: `{args.b}`; {args.rounds} rounds of {args.seconds:g} s, medians\n")
    print("| load | A p50 ms | B p50 ms | A steps/s | B steps/s | B ÷ A steps/s |", end="")
    print(" A µs CPU/step | B µs CPU/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    async with (
        seqserve_server(args.model_dir, *shlex.split(args.a)) as a,
        seqserve_server(args.model_dir, *shlex.split(args.b)) as b,
    ):
        for kind, load in LOADS:
            runs: dict[str, list[Run]] = {"a": [], "b": []}
            for _ in range(args.rounds):
                for name, server in (("a", a), ("b", b)):
                    runs[name].append(await _measure(server, frames, kind, load, args.seconds))
            p50 = {k: statistics.median(r.p50 for r in v) for k, v in runs.items()}
            rate = {k: statistics.median(r.rate for r in v) for k, v in runs.items()}
            cpu = {
                k: statistics.median(r.server_cpu / r.rate * 1e6 for r in v)
                for k, v in runs.items()
            }
            what = f"{load} session{'s' * (load > 1)}, 1 frame/message"
            if kind == "mux":
                what = f"StreamBatch, {load} per message"
            print(
                f"| {what} | {p50['a']:.3f} | {p50['b']:.3f} | {rate['a']:,.0f} | "
                f"{rate['b']:,.0f} | {rate['b'] / rate['a']:.3f} | {cpu['a']:.1f} | "
                f"{cpu['b']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
