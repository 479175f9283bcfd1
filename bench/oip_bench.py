"""One frame per message over the Open Inference Protocol's ``ModelStreamInfer`` (stock
tritonclient as the client) against seqserve's native ``Stream``, on the same server, in one run.

    python -P bench/oip_bench.py [--seconds 3] [--repeats 3] [--concurrency 1 128]

For each concurrency c, c sequences each hold one stream and send one frame, wait for its
answer, and repeat (the native side is scenario 2 of bench/suite.py). The two protocols
alternate, ``--repeats`` times, and the table shows medians. The cost of a step is the
server's CPU time per step (server cores busy ÷ steps/s); the goal is at most 1.3 times the
native cost. The client (this process) is tritonclient's ``grpc.aio`` client for the
protocol and the suite's grpc.aio client for the native API, both on one event loop; they
share the machine with the server, so run it on a quiet machine and compare only figures of
one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python -P bench/oip_bench.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.clients import BenchError, Frames, Run, _Window, stream_sessions
from bench.servers import ROOT, Server, seqserve_server

MODEL = "basicmotions"


async def _oip_sequence(client: Any, sid: str, inputs: list[Any], window: _Window) -> None:
    """One sequence on its own ModelStreamInfer call, one frame in flight."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        while (item := await queue.get()) is not None:
            yield item

    responses = client.stream_infer(requests())
    position = 0
    try:
        while (sent := time.perf_counter()) < window.stop:
            await queue.put(
                {
                    "model_name": MODEL,
                    "inputs": [inputs[position % len(inputs)]],
                    "sequence_id": sid,
                    "sequence_start": position == 0,
                }
            )
            result, error = await responses.__anext__()
            if error is not None:
                raise BenchError(f"{sid}: {error}")
            result.as_numpy("probabilities")
            window.add(sent, time.perf_counter(), 1)
            if position == 0:
                await window.arrived()
            position += 1
    finally:
        await queue.put(None)
        async for _ in responses:
            pass


async def oip_sessions(
    server: Server, frames: Frames, sessions: int, *, warmup: float, seconds: float, tag: str
) -> Run:
    from tritonclient.grpc import InferInput
    from tritonclient.grpc.aio import InferenceServerClient

    window = _Window(sessions, warmup, seconds)
    recordings: dict[int, list[Any]] = {}
    for i in range(min(sessions, len(frames.x))):
        made = []
        for frame in frames.recording(i):
            tensor = InferInput("frames", [1, 1, frames.x.shape[2]], "FP32")
            tensor.set_data_from_numpy(frame.reshape(1, 1, -1))
            made.append(tensor)
        recordings[i] = made
    client = InferenceServerClient(server.target)
    try:
        load = asyncio.gather(
            *(
                _oip_sequence(client, f"{tag}-{i}", recordings[i % len(recordings)], window)
                for i in range(sessions)
            )
        )
        return await window.measure(server, load)
    finally:
        await client.close()


def _cost_us(run: Run) -> float:
    """Server CPU time per step, µs."""
    return run.server_cpu / run.rate * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 128])
    opts = parser.parse_args()
    model_dir = Path(os.environ.get("SEQSERVE_MODEL_DIR") or ROOT / "models" / "basicmotions")
    with np.load(model_dir / "samples.npz") as data:
        frames = Frames(data["x"])
    print(
        "| sequences | native p50 ms | OIP p50 ms | native steps/s | OIP steps/s | "
        "native µs CPU/step | OIP µs CPU/step | OIP ÷ native cost |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    async with seqserve_server(model_dir) as server:
        for c in opts.concurrency:
            native: list[Run] = []
            oip: list[Run] = []
            for r in range(opts.repeats):
                kw = {"warmup": opts.warmup, "seconds": opts.seconds}
                native.append(await stream_sessions(server, frames, c, tag=f"n{c}-{r}", **kw))
                oip.append(await oip_sessions(server, frames, c, tag=f"o{c}-{r}", **kw))

            def med(runs: list[Run], key: Any) -> float:
                return statistics.median(key(run) for run in runs)

            n_cost, o_cost = med(native, _cost_us), med(oip, _cost_us)
            print(
                f"| {c} | {med(native, lambda r: r.p50):.3f} | {med(oip, lambda r: r.p50):.3f} "
                f"| {med(native, lambda r: r.rate):,.0f} | {med(oip, lambda r: r.rate):,.0f} "
                f"| {n_cost:.0f} | {o_cost:.0f} | {o_cost / n_cost:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
