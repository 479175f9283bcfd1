"""Round trip and throughput of one-frame-per-message streaming: seqserve next to a bare grpc
echo of the same messages, the same client, in the same run (scenario 2 of bench/suite.py alone).

    python -P bench/stream_bench.py [--seconds 3] [--concurrency 1 16 128]

Each server runs in its own process (the client is this process). For each concurrency c, c
sessions each hold one stream and send one frame, wait for its answer, and repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/stream_bench.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.clients import Frames, stream_sessions
from bench.servers import ROOT, echo_server, seqserve_server


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    opts = parser.parse_args()
    model_dir = Path(os.environ.get("SEQSERVE_MODEL_DIR") or ROOT / "models" / "basicmotions")
    with np.load(model_dir / "samples.npz") as data:
        frames = Frames(data["x"])
    async with echo_server() as echo, seqserve_server(model_dir) as seq:
        print(
            "| concurrency | echo p50 ms | echo p99 ms | echo msg/s | seqserve p50 ms | "
            "seqserve p99 ms | seqserve steps/s | steps/s ÷ echo |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in opts.concurrency:
            e = await stream_sessions(
                echo, frames, c, warmup=0.5, seconds=opts.seconds, tag=f"echo-{c}"
            )
            s = await stream_sessions(
                seq, frames, c, warmup=0.5, seconds=opts.seconds, tag=f"seq-{c}"
            )
            print(
                f"| {c} | {e.p50:.3f} | {e.p99:.3f} | {e.rate:,.0f} | {s.p50:.3f} | "
                f"{s.p99:.3f} | {s.rate:,.0f} | {s.rate / e.rate:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
