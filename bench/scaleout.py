"""Scale-out figures, one run: steps/s with 1 and 2 worker processes, and what the shared store
costs per step with a checkpoint every frame (K = 1) against every 16 frames (K = 16).

    python -P bench/scaleout.py [--seconds 5] [--sessions 256] [--clients 4]

Needs redis-server on PATH (started here on a free loopback port). Every configuration serves
the bundled model; the load is ``--clients`` client processes, each with its own connection and
its own ``--sessions`` sessions, streaming one frame per session per StreamBatch message with a
few messages in flight. Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "basicmotions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(
    port: int,
    prefix: str,
    sessions: int,
    inflight: int,
    seconds: float,
    results: multiprocessing.Queue,
) -> None:  # type: ignore[type-arg]
    import grpc
    import numpy as np

    from seqserve.proto import seqserve_pb2 as pb
    from seqserve.proto import seqserve_pb2_grpc as pb_grpc
    from seqserve.proto.codec import to_matrix

    async def run() -> tuple[int, float, int]:
        ids = [f"{prefix}-{i}" for i in range(sessions)]
        frames = to_matrix(np.random.default_rng(0).random((sessions, 6), np.float32))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = pb_grpc.SeqServeStub(channel)
            credit: asyncio.Queue[None] = asyncio.Queue()
            for _ in range(inflight):
                credit.put_nowait(None)

            async def requests():  # type: ignore[no-untyped-def]
                position = 0
                while True:
                    await credit.get()
                    yield pb.StepBatchRequest(
                        session_ids=ids,
                        positions=[position] * sessions,
                        frames=frames,
                        start=position == 0,
                    )
                    position += 1

            call = stub.StreamBatch(requests())
            answered = errors = 0
            started = None
            async for response in call:
                errors += len(response.errors)
                if response.errors and os.environ.get("SCALEOUT_DEBUG"):
                    print(
                        response.errors[0].error.reason,
                        response.errors[0].error.message,
                        flush=True,
                    )
                credit.put_nowait(None)
                answered += 1
                if answered == 10:
                    started, counted = time.perf_counter(), answered
                if started is not None and time.perf_counter() - started >= seconds:
                    break
            call.cancel()
            assert started is not None
            return (answered - counted) * sessions, time.perf_counter() - started, errors

    results.put(asyncio.run(run()))


def _serve(port: int, store: str, workers: int, every: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "seqserve.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--http-port",
        "-1",
        "--snapshot-path",
        "",
        "--model-dir",
        str(MODEL),
        "--store",
        store,
        "--checkpoint-every",
        str(every),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def measure(store: str, workers: int, every: int, args: argparse.Namespace) -> tuple[float, int]:
    port = _free_port()
    server = _serve(port, store, workers, every)
    try:
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
        tag = f"{store[:5]}{workers}{every}-{time.monotonic_ns()}"
        clients = [
            context.Process(
                target=_client,
                args=(port, f"{tag}-{c}", args.sessions, args.inflight, args.seconds, results),
            )
            for c in range(args.clients)
        ]
        for client in clients:
            client.start()
        got = [results.get(timeout=args.seconds + 120) for _ in clients]
        for client in clients:
            client.join()
    finally:
        server.terminate()
        server.wait(60)
    steps = sum(g[0] for g in got)
    seconds = max(g[1] for g in got)
    return steps / seconds, sum(g[2] for g in got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=256, help="sessions per client")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--inflight", type=int, default=4, help="messages in flight per client")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (scripts/system-deps.sh installs it)")
    redis_port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{redis_port}/0"
        time.sleep(0.5)
        try:
            runs = [
                ("memory", "memory", 1, 1),
                ("redis, K=1", url, 1, 1),
                ("redis, K=16", url, 1, 16),
                ("redis, K=1, 2 workers", url, 2, 1),
                ("redis, K=16, 2 workers", url, 2, 16),
            ]
            rows = []
            for name, store, workers, every in runs:
                rate, errors = measure(store, workers, every, args)
                rows.append((name, workers, rate, errors))
                print(f"{name:24s} {rate:>10,.0f} steps/s  ({errors} entry errors)", flush=True)
        finally:
            redis.terminate()
            redis.wait()
    base = rows[0][2]
    print(
        f"\n{os.cpu_count()} cores; {args.clients} client processes x {args.sessions} "
        f"sessions, {args.inflight} StreamBatch messages in flight each\n"
    )
    print("| configuration | workers | steps/s | vs memory, 1 worker | µs per step |")
    print("|---|---|---|---|---|")
    for name, workers, rate, _ in rows:
        print(f"| {name} | {workers} | {rate:,.0f} | {rate / base:.2f} | {1e6 / rate:.1f} |")


if __name__ == "__main__":
    main()
