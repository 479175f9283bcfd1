"""A window-trained model (the seed architecture on windows of T = 30 frames of 126 features)
served in window mode, against the tutorial loop (Keras ``predict`` on the last T frames after
every frame) and against the same model served as a stateful stream, in one run:

- per-step p50 (one session, one frame per message) and steps/s at 1 and 128 sessions, with the
  server's CPU per step;
- in process, the two ways to serve a window: T staggered states through the step graph (what
  the server does) and a ring of the last T frames re-run through the sequence graph;
- resident memory per idle session in window mode at T = 5 and T = 30.

    python -P bench/window_bench.py [--seconds 3] [--quick] [--out bench/results/window.json]

Needs the export extra (TensorFlow) to build and convert the model; the weights are the seeded,
untrained, stable ones of tests/window_models.py (what is timed does not depend on training).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/window_bench.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np

from bench.clients import Frames, Run, stream_sessions
from bench.servers import seqserve_server

FEATURES = 126
CHUNK = 512  # sessions stepped at once by the memory probe


def _convert(window: int, out: Path) -> tuple[object, Path]:
    from window_models import seed_window_model

    from seqserve.export.cli import main as export

    model = seed_window_model(window)
    source = out / f"window{window}.keras"
    model.save(source)
    target = out / f"window{window}"
    labels = ",".join(f"c{i}" for i in range(int(model.outputs[0].shape[-1])))
    if export(["convert", str(source), "-o", str(target), "--labels", labels]) != 0:
        raise SystemExit("conversion failed")
    return model, target


def tutorial_loop(model: object, frames: np.ndarray, window: int, steps: int) -> dict[str, float]:
    """Keras ``predict`` on the last ``window`` frames after every frame, one session."""
    times = []
    for t in range(window, window + steps):
        started = time.perf_counter()
        model.predict(frames[None, t - window : t], verbose=0)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - started)
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "steps": steps}


def _summary(run: Run) -> dict[str, float]:
    return {
        "p50_ms": run.p50,
        "p99_ms": float(np.percentile(run.latencies_ms, 99)),
        "steps_per_s": run.steps / run.seconds,
        "server_cores": run.server_cpu,
        "server_us_per_step": 1e6 * run.server_cpu * run.seconds / max(run.steps, 1),
    }


async def served(
    directory: Path, mode: str, frames: Frames, loads: list[int], warmup: float, seconds: float
) -> dict[str, dict[str, float]]:
    out = {}
    async with seqserve_server(directory, "--serving-mode", mode) as server:
        for sessions in loads:
            run = await stream_sessions(
                server, frames, sessions, warmup=warmup, seconds=seconds, tag=f"{mode}{sessions}"
            )
            out[str(sessions)] = _summary(run)
    return out


def _timed(call: Callable[[], object], batch: int, budget: float) -> float:
    """CPU microseconds per session-step of ``call`` (one call steps ``batch`` sessions)."""
    calls, started = 0, time.process_time()
    while time.process_time() - started < budget or calls < 3:
        call()
        calls += 1
    return (time.process_time() - started) / (calls * batch) * 1e6


def inprocess(directory: Path, window: int, batches: list[int], budget: float) -> dict[str, object]:
    """CPU per session-step of the two ways to serve a window, at each batch size."""
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime
    from seqserve.server.window import WindowRuntime

    runtime = Runtime(load_model_spec(directory))
    staggered = WindowRuntime(runtime, window)
    rng = np.random.default_rng(0)
    out: dict[str, object] = {}
    for batch in batches:
        frames = rng.standard_normal((batch, FEATURES)).astype(np.float32)
        states = staggered.zero_states(batch)
        positions = np.full(batch, 100, np.int64)
        ring = rng.standard_normal((batch, window, FEATURES)).astype(np.float32)
        zero = runtime.zero_states(batch)

        out[str(batch)] = {
            "staggered_us_per_step": _timed(
                lambda f=frames, s=states, p=positions: staggered.step(f, s, p), batch, budget
            ),
            "ring_us_per_step": _timed(
                lambda r=ring, z=zero: runtime.sequence(r, z), batch, budget
            ),
            "stateful_us_per_step": _timed(
                lambda f=frames, z=zero: runtime.step(f, z), batch, budget
            ),
        }
    return out


def _rss() -> int:
    gc.collect()
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


async def memory(directory: Path, window: int, sessions: int) -> dict[str, float]:
    """Resident bytes per idle window session (each stepped once), in process: onnxruntime's
    buffers for a batch of ``CHUNK`` sessions are grown first, on sessions of their own, so the
    difference is the sessions' own memory."""
    from seqserve.server.engine import Engine
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime
    from seqserve.server.settings import Settings
    from seqserve.server.window import WindowRuntime

    base = Runtime(load_model_spec(directory))
    runtime = WindowRuntime(base, window)
    settings = Settings(max_sessions=sessions + CHUNK, snapshot_path="", metrics_port=-1)
    engine = Engine(runtime.spec, runtime, settings)
    engine.start()
    frame = np.zeros((1, FEATURES), np.float32)

    async def step(ids: range) -> None:
        for lo in range(ids.start, ids.stop, CHUNK):
            await asyncio.gather(
                *(
                    engine.step(f"s{i}", 0, frame, start=True)
                    for i in range(lo, min(lo + CHUNK, ids.stop))
                )
            )

    await step(range(CHUNK))  # onnxruntime's buffers for a full batch
    empty = _rss()
    await step(range(CHUNK, CHUNK + sessions))
    held = _rss()
    await engine.stop()
    return {
        "sessions": sessions,
        "bytes_per_session": (held - empty) / sessions,
        "state_bytes": engine.bank.bytes_per_slot,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="window-bench-"))
    model30, dir30 = _convert(30, work)
    _, dir5 = _convert(5, work)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 200, FEATURES)).astype(np.float32)
    frames = Frames(x)
    loads = [1, 16] if args.quick else [1, 128]
    results: dict[str, object] = {"window": 30, "features": FEATURES}
    results["tutorial"] = tutorial_loop(model30, x[0], 30, 5 if args.quick else 30)
    for mode in ("window", "stateful"):
        results[mode] = await served(dir30, mode, frames, loads, args.warmup, args.seconds)
    results["inprocess"] = inprocess(dir30, 30, [1, 128], 0.2 if args.quick else 1.0)
    count = 500 if args.quick else 5000
    results["memory"] = {
        "5": await memory(dir5, 5, count),
        "30": await memory(dir30, 30, count),
    }
    one = str(loads[0])
    many = str(loads[-1])
    window, stateful = results["window"], results["stateful"]  # type: ignore[assignment]
    results["ratios"] = {
        "tutorial_p50_over_window_p50": results["tutorial"]["p50_ms"]  # type: ignore[index]
        / window[one]["p50_ms"],
        "window_over_stateful_p50_1": window[one]["p50_ms"] / stateful[one]["p50_ms"],
        f"window_over_stateful_cpu_per_step_{many}": window[many]["server_us_per_step"]
        / stateful[many]["server_us_per_step"],
        f"stateful_over_window_steps_per_s_{many}": stateful[many]["steps_per_s"]
        / window[many]["steps_per_s"],
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="short runs, small loads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 0.5), min(args.warmup, 0.3)
    results = asyncio.run(main_async(args))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
