"""The benchmark suite: every scenario in one run (figures are comparable only within a run on a
noisy machine), written to REPORT.md, results.json and PNG plots.

    python -P bench/suite.py [--quick] [--out bench/results] [--only limits,stream,...]

1. limits: in-process onnxruntime (both graphs, batch 1 .. 1,024) and a bare grpc.aio echo
   server driven by the same client, same messages, same concurrency as the seqserve runs
2. stream: 1 .. 1,024 sessions, each on its own stream, one frame per message
3. mux: StreamBatch, one frame for each of 64 / 256 sessions per message
4. predict: 1,024 sequences x 100 steps in one Predict call vs. in-process onnxruntime
5. today: (a) Keras model.predict on a sliding window after every frame; (b) a stateless server
   sent the whole window every step (seqserve's own Predict)
6. memory: resident memory per idle session at 100 k sessions

Servers run as subprocesses (the client is this process); so do Keras and the memory probe.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python -P bench/suite.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np

from bench.clients import (
    Frames,
    Run,
    predict_caller,
    stream_batches,
    stream_sessions,
    window_predicts,
)
from bench.limits import ort_curve, sequence_pass
from bench.machine import CpuMark, load_note, machine_info
from bench.plots import write_plots
from bench.report import write_report
from bench.results import Results, Summary
from bench.servers import BENCH, ROOT, Server, echo_server, floor_server, seqserve_server
from seqserve.server.model import load_model_spec
from seqserve.server.runtime import Runtime

SCENARIOS = ("limits", "stream", "mux", "predict", "today", "memory")


@dataclass(frozen=True, slots=True)
class Config:
    quick: bool = False
    seconds: float = 3.0
    warmup: float = 1.0
    rounds: int = 3
    concurrency: tuple[int, ...] = (1, 16, 128, 1024)
    mux_entries: tuple[int, ...] = (64, 256)
    mux_streams: int = 4
    mux_depth: int = 2
    ort_batches: tuple[int, ...] = tuple(2**k for k in range(11))
    ort_budget: float = 0.5
    predict_sequences: int = 1024
    predict_steps: int = 100
    predict_repeats: int = 5
    keras_steps: int = 50
    window: int = 100
    window_clients: tuple[int, ...] = (1, 16)
    memory_sessions: int = 100_000
    server_args: str = ""
    only: tuple[str, ...] = SCENARIOS


HELP = {
    "seconds": "measuring window of each network run, after --warmup",
    "warmup": "seconds of load before each measuring window",
    "rounds": "runs of each network measurement (echo and seqserve alternating); medians",
    "concurrency": "sessions for the one-frame-per-message runs (2), one stream each",
    "mux_entries": "sessions per StreamBatch message (3)",
    "mux_streams": "StreamBatch streams, each with its own sessions (3)",
    "mux_depth": "StreamBatch messages in flight per stream (3)",
    "ort_batches": "batch sizes of the in-process onnxruntime curve (1)",
    "ort_budget": "seconds of calls per (graph, batch) point (1)",
    "predict_sequences": "sequences in the batch Predict call (4)",
    "predict_steps": "steps per sequence (4)",
    "predict_repeats": "timed Predict calls and in-process passes (4)",
    "keras_steps": "timed Keras model.predict steps (5a)",
    "window": "sliding window in frames (5a, 5b)",
    "window_clients": "stateless Predict clients (5b)",
    "memory_sessions": "idle sessions held for the memory probe (6)",
    "server_args": "extra seqserve-server flags, one string (--server-args='--ort-threads 2')",
}


QUICK = Config(
    quick=True,
    seconds=0.5,
    warmup=0.3,
    rounds=1,
    concurrency=(1, 16, 128),
    ort_batches=(1, 16, 256),
    ort_budget=0.1,
    predict_sequences=256,
    predict_repeats=1,
    keras_steps=5,
    window_clients=(1,),
    memory_sessions=10_000,
)


async def _guard(results: Results, name: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run one scenario; a failure is recorded in the report and the suite goes on."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
    try:
        await work()
    except Exception as exc:
        results.failures[name] = f"{type(exc).__name__}: {exc}"
        print(f"  {name} failed: {results.failures[name]}", file=sys.stderr, flush=True)


def _subprocess_json(command: list[str], timeout: float) -> dict[str, object]:
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if run.returncode != 0:
        raise RuntimeError(
            f"{Path(command[2]).name} exited {run.returncode}: {run.stderr.strip()[-1500:]}"
        )
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class Suite:
    def __init__(self, config: Config, model_dir: Path, results: Results) -> None:
        self.config = config
        self.model_dir = model_dir
        self.spec = load_model_spec(model_dir)
        with np.load(model_dir / "samples.npz") as data:
            self.x = np.ascontiguousarray(data["x"], np.float32)
        self.frames = Frames(self.x)
        self.results = results
        steps, seqs = config.predict_steps, config.predict_sequences
        looped = np.concatenate([self.x] * -(-steps // self.x.shape[1]), axis=1)[:, :steps]
        self.sequences = np.ascontiguousarray(looped[np.arange(seqs) % len(self.x)])

    async def limits_inprocess(self) -> None:
        c = self.config
        self.results.ort = ort_curve(self.spec, self.x, list(c.ort_batches), c.ort_budget)

    async def _rounds(
        self,
        load: int,
        pairs: list[tuple[Server, list[Summary]]],
        measure: Callable[[Server, int], Awaitable[Run]],
    ) -> None:
        """``rounds`` runs of each server at one load, the servers alternating; each server's
        row gets the medians."""
        runs: list[list[Run]] = [[] for _ in pairs]
        for i in range(self.config.rounds):
            for (server, _), done in zip(pairs, runs, strict=True):
                done.append(await measure(server, i))
        for (_, rows), done in zip(pairs, runs, strict=True):
            rows.append(Summary.of(load, done))

    async def stream(self, echo: Server, floor: Server, seq: Server) -> None:
        c, r = self.config, self.results
        for sessions in c.concurrency:

            async def measure(server: Server, i: int, sessions: int = sessions) -> Run:
                return await stream_sessions(
                    server,
                    self.frames,
                    sessions,
                    warmup=c.warmup,
                    seconds=c.seconds,
                    tag=f"s{sessions}r{i}",
                )

            pairs = [(echo, r.echo_stream), (floor, r.floor_stream), (seq, r.stream)]
            await self._rounds(sessions, pairs, measure)

    async def mux(self, echo: Server, seq: Server) -> None:
        c, r = self.config, self.results
        r.mux_status = "ok"
        pairs = [(echo, r.echo_mux), (seq, r.mux)]
        for entries in c.mux_entries:

            async def measure(server: Server, i: int, entries: int = entries) -> Run:
                return await stream_batches(
                    server,
                    self.frames,
                    entries,
                    streams=c.mux_streams,
                    depth=c.mux_depth,
                    warmup=c.warmup,
                    seconds=c.seconds,
                    tag=f"m{entries}r{i}",
                )

            try:
                await self._rounds(entries, pairs, measure)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED or len(pairs) == 1:
                    raise
                r.mux_status = "not implemented (UNIMPLEMENTED)"
                pairs = pairs[:1]  # the echo ceiling is still worth having
                await self._rounds(entries, pairs, measure)

    async def predict(self, seq: Server) -> None:
        """Predict calls alternate with the same work in process, so drift hits both alike."""
        r, runtime = self.results, Runtime(self.spec)
        chunk = 256  # the server's --max-batch default: Predict runs this many per call
        async with predict_caller(seq, self.sequences) as call:
            for i in range(self.config.predict_repeats + 1):  # the first round warms up
                server = await call()
                inproc = sequence_pass(runtime, self.sequences, chunk)
                whole = sequence_pass(runtime, self.sequences, len(self.sequences))
                if i:
                    r.predict_server_s.append(server)
                    r.predict_inprocess_s.append(inproc)
                    r.predict_whole_s.append(whole)

    async def stateless(self, seq: Server) -> None:
        c = self.config
        for clients in c.window_clients:

            async def measure(server: Server, i: int, clients: int = clients) -> Run:
                return await window_predicts(
                    server, self.frames, clients, c.window, warmup=c.warmup, seconds=c.seconds
                )

            await self._rounds(clients, [(seq, self.results.window)], measure)

    async def keras(self) -> None:
        c = self.config
        if importlib.util.find_spec("tensorflow") is None:
            self.results.keras = {"error": "TensorFlow is not installed (seqserve[export])"}
            return
        self.results.keras = _subprocess_json(
            [
                sys.executable,
                "-P",
                str(BENCH / "keras_window.py"),
                "--model-dir",
                str(self.model_dir),
                "--steps",
                str(c.keras_steps),
                "--window",
                str(c.window),
            ],
            timeout=600,
        )

    async def memory(self) -> None:
        self.results.memory = _subprocess_json(
            [
                sys.executable,
                "-P",
                str(BENCH / "memory.py"),
                "--model-dir",
                str(self.model_dir),
                "--sessions",
                str(self.config.memory_sessions),
            ],
            timeout=600,
        )

    async def run(self) -> None:
        r, only = self.results, self.config.only
        if "limits" in only:
            await _guard(r, "limits", self.limits_inprocess)
        if {"limits", "stream", "mux", "predict", "today"} & set(only):
            extra = shlex.split(self.config.server_args)
            async with (
                echo_server() as echo,
                floor_server(self.model_dir) as floor,
                seqserve_server(self.model_dir, *extra) as seq,
            ):
                if {"limits", "stream"} & set(only):
                    await _guard(r, "stream", lambda: self.stream(echo, floor, seq))
                if "mux" in only:
                    await _guard(r, "mux", lambda: self.mux(echo, seq))
                if "predict" in only:
                    await _guard(r, "predict", lambda: self.predict(seq))
                if "today" in only:
                    await _guard(r, "today", lambda: self.stateless(seq))
        if "today" in only:
            await _guard(r, "keras", self.keras)
        if "memory" in only:
            await _guard(r, "memory", self.memory)


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs and small sizes (well under a minute): a smoke test",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default: bench/results, with --quick bench/results/quick (ignored by git)",
    )
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "basicmotions")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    for f in dataclasses.fields(Config):
        if f.name in ("quick", "only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        full, quick = (
            " ".join(map(str, v)) if isinstance(v, tuple) else v
            for v in (f.default, getattr(QUICK, f.name))
        )
        text = f"{HELP[f.name]} [{full}; --quick {quick}]"
        if isinstance(f.default, tuple):
            parser.add_argument(flag, type=int, nargs="+", help=text)
        else:
            parser.add_argument(flag, type=type(f.default), help=text)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    changes = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if f.name not in ("quick", "only") and getattr(args, f.name) is not None
    }
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    if args.only:
        chosen = tuple(s.strip() for s in args.only.split(","))
        unknown = set(chosen) - set(SCENARIOS)
        if unknown:
            parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
        changes["only"] = chosen
    out = args.out or BENCH / "results" / ("quick" if args.quick else "")
    return dataclasses.replace(config, **changes), out, args.model_dir.resolve()


def main(argv: list[str] | None = None) -> int:
    config, out, model_dir = parse_args(argv)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(config=dataclasses.asdict(config))
    results.machine = machine_info()
    mark, started = CpuMark.now(), time.perf_counter()
    asyncio.run(Suite(config, model_dir, results).run())
    results.machine["suite seconds"] = f"{time.perf_counter() - started:.0f}"
    results.machine.update(load_note(mark))
    for package in ("tensorflow", "keras"):
        if package in results.keras:
            results.machine[package] = str(results.keras[package])
    plots = write_plots(results, out)
    results.save(out / "results.json")
    write_report(results, out / "REPORT.md", plots)
    print(f"wrote {out / 'REPORT.md'}", file=sys.stderr)
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
