"""onnxruntime options and graph choice for the step path, measured in one run.

    python -P bench/ort_options.py [MODEL_DIR]

Prints per-call time of the step graph and of the sequence graph at T=1 for intra-op threads 1/2
with and without spin-waiting, and the cost of hopping to a worker thread for a one-step call.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from seqserve.server.model import load_model_spec
from seqserve.server.runtime import Runtime


def _per_call(fn, *args, n: int) -> float:
    for _ in range(max(10, n // 20)):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n


def main() -> None:
    spec = load_model_spec(sys.argv[1] if len(sys.argv) > 1 else None)
    rng = np.random.default_rng(0)
    print(
        "| threads | spinning | batch | step graph µs | sequence graph (T=1) µs "
        "| steps/s (step graph) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for threads in (1, 2):
        for spinning in (False, True):
            runtime = Runtime(spec, threads=threads, spinning=spinning)
            for batch in (1, 16, 256):
                n = 2000 if batch < 100 else 200
                states = runtime.zero_states(batch)
                frames = rng.standard_normal((batch, spec.features)).astype(np.float32)
                step = _per_call(runtime.step, frames, states, n=n)
                seq = _per_call(runtime.sequence, frames[:, None], states, n=n)
                print(
                    f"| {threads} | {spinning} | {batch} | {step * 1e6:.0f} | {seq * 1e6:.0f} | "
                    f"{batch / step:,.0f} |",
                    flush=True,
                )
    runtime = Runtime(spec)
    frames = rng.standard_normal((1, spec.features)).astype(np.float32)
    states = runtime.zero_states(1)
    inline = _per_call(runtime.step, frames, states, n=2000)
    executor = ThreadPoolExecutor(1)

    async def hops(n: int) -> float:
        loop = asyncio.get_running_loop()
        for _ in range(100):
            await loop.run_in_executor(executor, runtime.step, frames, states)
        t0 = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(executor, runtime.step, frames, states)
        return (time.perf_counter() - t0) / n

    hop = asyncio.run(hops(2000))
    print(
        f"\none step inline: {inline * 1e6:.0f} µs; through a worker thread from asyncio: "
        f"{hop * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
