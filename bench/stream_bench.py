"""Round trip and throughput of one-frame-per-message streaming: seqserve next to a bare grpc
echo of the same messages, the same client, in the same run.

    python -P bench/stream_bench.py [--seconds 3] [--concurrency 1 16 128]

Each server runs in its own process (the client is this process). For each concurrency c, c
sessions each hold one stream and send one frame, wait for its answer, and repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import to_matrix

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


async def _wait_ready(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)


async def _session(stub: pb_grpc.SeqServeStub, sid: str, frames: np.ndarray, stop: float,
                   rtts: list[float]) -> None:
    queue: asyncio.Queue[pb.StepRequest | None] = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    call = stub.Stream(requests())
    position = 0
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        queue.put_nowait(pb.StepRequest(session_id=sid, position=position,
                                        frames=to_matrix(frames[position % len(frames)]),
                                        start=position == 0))
        response = await call.read()
        rtts.append(time.perf_counter() - t0)
        if response.HasField("error"):
            raise RuntimeError(response.error.message)
        position += 1
    queue.put_nowait(None)
    while await call.read() is not grpc.aio.EOF:
        pass


async def run(port: int, concurrency: int, seconds: float, frames: np.ndarray, tag: str
              ) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SeqServeStub(channel)
        rtts: list[float] = []
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(_session(stub, f"{tag}-{concurrency}-{i}", frames, stop, rtts)
                               for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = np.array(rtts) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "rate": len(rtts) / elapsed}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    opts = parser.parse_args()
    model_dir = Path(os.environ.get("SEQSERVE_MODEL_DIR") or ROOT / "models" / "basicmotions")
    with np.load(model_dir / "samples.npz") as data:
        frames = data["x"][0].astype(np.float32)
    echo_port, seq_port = _free_port(), _free_port()
    procs = [
        _start([sys.executable, "-P", str(ROOT / "bench" / "echo_server.py"), str(echo_port)]),
        _start([sys.executable, "-P", "-m", "seqserve.server", "--host", "127.0.0.1",
                "--port", str(seq_port), "--metrics-port", "-1", "--snapshot-path", "",
                "--log-level", "warning"]),
    ]
    try:
        await _wait_ready(echo_port)
        await _wait_ready(seq_port)
        print("| concurrency | echo p50 ms | echo p99 ms | echo msg/s | seqserve p50 ms | "
              "seqserve p99 ms | seqserve steps/s | steps/s ÷ echo |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in opts.concurrency:
            await run(echo_port, c, 0.5, frames, "warm")
            await run(seq_port, c, 0.5, frames, "warm")
            echo = await run(echo_port, c, opts.seconds, frames, "echo")
            seq = await run(seq_port, c, opts.seconds, frames, "seq")
            print(f"| {c} | {echo['p50']:.3f} | {echo['p99']:.3f} | {echo['rate']:,.0f} | "
                  f"{seq['p50']:.3f} | {seq['p99']:.3f} | {seq['rate']:,.0f} | "
                  f"{seq['rate'] / echo['rate']:.2f} |", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
