"""The model repository's costs, one run (figures are comparable only within a run):

1. memory: the server process's resident memory (VmRSS) before and after each further version
   of basicmotions is loaded (LoadModel), idle; the delta per version.
2. load latency: ``--sessions`` sessions, each on its own Stream, one frame per message, closed
   loop; the p50 / p99 round trip in a steady window and in a window during which versions are
   loaded and unloaded back to back (LoadModel, UnloadModel; every round trip sent while a
   LoadModel was in flight counts as "during a load"). Goal: p99 during loads at most 2x steady,
   0 errors.
3. side by side: the same load (``--mux-streams`` StreamBatch streams of ``--entries`` sessions,
   one frame each per message, ``--depth`` in flight) on one model, on two versions of one
   model, and on two models (basicmotions + japanesevowels: 6 and 12 features); steps/s,
   median of ``--rounds``, each against the one-model figure.

    python -P bench/repository_bench.py [--quick] [--json out.json] [--seconds 3] ...

The server runs as a subprocess (bench/servers.py) on a repository built in a temporary folder
from the bundled models: versions are copies of basicmotions (the same graphs: loading one costs
what loading any version of this model costs). Nothing here is asserted; it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np

from bench.clients import Frames
from bench.servers import ROOT, Server, cpu_seconds, repository_server
from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc

MODELS = ROOT / "models"
FILES = ("model.json", "sequence.onnx", "step.onnx", "reference.npz", "samples.npz")
BM, JV = "basicmotions", "japanesevowels"
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True, slots=True)
class Config:
    quick: bool = False
    versions: int = 4  # further versions loaded for the memory figure
    sessions: int = 200
    seconds: float = 5.0
    warmup: float = 1.0
    entries: int = 128
    mux_streams: int = 2
    depth: int = 2
    rounds: int = 3


QUICK = Config(quick=True, versions=2, seconds=1.0, warmup=0.3, rounds=1)


@dataclass(slots=True)
class Figures:
    machine: str = ""
    rss_base_mib: float = 0.0
    rss_per_version_mib: list[float] = field(default_factory=list)
    steady_p50_ms: float = 0.0
    steady_p99_ms: float = 0.0
    loading_p50_ms: float = 0.0
    loading_p99_ms: float = 0.0
    loading_answers: int = 0
    steady_answers: int = 0
    loads: int = 0
    load_seconds: list[float] = field(default_factory=list)
    errors: int = 0
    steady_rate: float = 0.0
    loading_rate: float = 0.0
    side_by_side: dict[str, float] = field(default_factory=dict)
    server_cpu: dict[str, float] = field(default_factory=dict)


# -- the repository --------------------------------------------------------------------------------


def _copy(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(source / name, dest / name)


def build_repository(root: Path, versions: int) -> None:
    """basicmotions versions 1 .. ``versions``, japanesevowels version 1."""
    for v in range(1, versions + 1):
        _copy(MODELS / BM, root / BM / str(v))
    _copy(MODELS / JV, root / JV / "1")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


async def _settled_rss(pid: int) -> float:
    """VmRSS once it stops moving (allocator and onnxruntime settle after a load)."""
    last = rss_mib(pid)
    for _ in range(20):
        await asyncio.sleep(0.1)
        now = rss_mib(pid)
        if abs(now - last) < 0.05:
            return now
        last = now
    return last


# -- 1. memory per loaded version ------------------------------------------------------------------


async def memory(stub: pb_grpc.SeqServeStub, server: Server, config: Config, out: Figures) -> None:
    # One step first, so what a first request allocates is in the baseline.
    await stub.Step(
        pb.StepRequest(session_id="warm", position=0, frames=_one(6), start=True), timeout=60
    )
    base = await _settled_rss(server.pid)
    out.rss_base_mib = base
    for version in range(2, config.versions + 2):
        await stub.LoadModel(pb.LoadModelRequest(model=BM, version=version), timeout=120)
        now = await _settled_rss(server.pid)
        out.rss_per_version_mib.append(now - base)
        base = now
    for version in range(2, config.versions + 2):  # back to version 1 alone
        await stub.UnloadModel(pb.LoadModelRequest(model=BM, version=version), timeout=60)


def _one(features: int) -> pb.Matrix:
    from seqserve.proto.codec import to_matrix

    return to_matrix(np.zeros((1, features), np.float32))


# -- 2. latency while versions load ----------------------------------------------------------------


@dataclass(slots=True)
class _Log:
    sessions: int
    sent: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: int = 0
    stop: float = float("inf")  # set once every session is in
    waiting: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self) -> None:
        self.waiting += 1
        if self.waiting == self.sessions:
            self.all_in.set()


async def _session(
    stub: pb_grpc.SeqServeStub, sid: str, messages: list[pb.Matrix], log: _Log
) -> None:
    call = stub.Stream()
    position = 0
    try:
        while (sent := time.perf_counter()) < log.stop:
            await call.write(
                pb.StepRequest(
                    session_id=sid,
                    position=position,
                    frames=messages[position % len(messages)],
                    start=position == 0,
                )
            )
            response = await call.read()
            if response is grpc.aio.EOF:
                log.errors += 1
                return
            if response.HasField("error"):
                log.errors += 1
                return
            log.sent.append(sent)
            log.latency.append(time.perf_counter() - sent)
            if position == 0:
                log.arrived()
            position += 1
        await call.done_writing()
        await call.code()
    except grpc.aio.AioRpcError:
        log.errors += 1


async def latency(
    stub: pb_grpc.SeqServeStub, server: Server, frames: Frames, config: Config, out: Figures
) -> None:
    """Steady window, then a window of back-to-back loads, one set of sessions throughout."""
    log = _Log(config.sessions)
    sessions = asyncio.gather(
        *(_session(stub, f"lat-{i}", frames.session(i), log) for i in range(config.sessions))
    )
    await asyncio.wait_for(log.all_in.wait(), 120)  # every session open before anything counts
    start = time.perf_counter()
    steady = (start + config.warmup, start + config.warmup + config.seconds)
    loading = (steady[1], steady[1] + config.seconds)
    log.stop = loading[1]
    await asyncio.sleep(max(0.0, steady[0] - time.perf_counter()))
    cpu0 = cpu_seconds(server.pid)
    await asyncio.sleep(max(0.0, steady[1] - time.perf_counter()))
    cpu1 = cpu_seconds(server.pid)
    intervals: list[tuple[float, float]] = []
    version = 0
    while time.perf_counter() < loading[1]:
        number = 2 + version % config.versions
        version += 1
        began = time.perf_counter()
        await stub.LoadModel(pb.LoadModelRequest(model=BM, version=number), timeout=120)
        ended = time.perf_counter()
        intervals.append((began, ended))
        out.load_seconds.append(ended - began)
        await stub.UnloadModel(pb.LoadModelRequest(model=BM, version=number), timeout=60)
        # released by housekeeping (0.25 s turns) once it has no sessions: wait for it, so
        # every load is a real one
        while True:
            listing = await stub.ListModels(pb.ListModelsRequest(), timeout=60)
            if all(v.state != "draining" for v in listing.versions if v.version == number):
                break
            await asyncio.sleep(0.05)
    cpu2 = cpu_seconds(server.pid)
    await sessions
    out.loads = len(intervals)
    out.errors = log.errors
    sent = np.array(log.sent)
    lat = np.array(log.latency) * 1e3
    in_steady = (sent >= steady[0]) & (sent < steady[1])
    during = np.zeros(len(sent), np.bool_)
    for began, ended in intervals:
        during |= (sent >= began) & (sent < ended)
    if in_steady.any():
        out.steady_p50_ms = float(np.percentile(lat[in_steady], 50))
        out.steady_p99_ms = float(np.percentile(lat[in_steady], 99))
        out.steady_answers = int(in_steady.sum())
        out.steady_rate = float(in_steady.sum() / config.seconds)
    if during.any():
        out.loading_p50_ms = float(np.percentile(lat[during], 50))
        out.loading_p99_ms = float(np.percentile(lat[during], 99))
        out.loading_answers = int(during.sum())
        out.loading_rate = float(during.sum() / sum(e - b for b, e in intervals))
    out.server_cpu["steady"] = (cpu1 - cpu0) / config.seconds
    out.server_cpu["loading"] = (cpu2 - cpu1) / max(1e-9, time.perf_counter() - steady[1])


# -- 3. two models side by side --------------------------------------------------------------------


async def _batches(
    stub: pb_grpc.SeqServeStub,
    prefix: str,
    model: str,
    version: int,
    messages: list[pb.Matrix],
    entries: int,
    depth: int,
    window: tuple[float, float],
    counts: list[int],
) -> None:
    call = stub.StreamBatch()
    ids = [f"{prefix}-{j}" for j in range(entries)]
    position = 0
    inflight = 0

    async def send() -> None:
        nonlocal position, inflight
        await call.write(
            pb.StepBatchRequest(
                session_ids=ids,
                positions=[position] * entries,
                frames=messages[position % len(messages)],
                start=position == 0,
                model=model,
                version=version,
            )
        )
        position += 1
        inflight += 1

    for _ in range(depth):
        await send()
    while inflight:
        response = await call.read()
        inflight -= 1
        if response is grpc.aio.EOF or response.errors:
            counts[1] += 1
            call.cancel()
            return
        if window[0] <= time.perf_counter() < window[1]:
            counts[0] += entries
        if time.perf_counter() < window[1]:
            await send()
    await call.done_writing()
    await call.code()


async def side_by_side(
    stub: pb_grpc.SeqServeStub, frames: dict[str, Frames], config: Config, out: Figures
) -> None:
    """Steps/s of one load split over the streams as each layout says."""
    layouts: dict[str, Sequence[tuple[str, int]]] = {
        "one model (basicmotions)": [(BM, 1)],
        "two versions (basicmotions v1 + v2)": [(BM, 1), (BM, 2)],
        "two models (basicmotions + japanesevowels)": [(BM, 1), (JV, 1)],
        "one model (japanesevowels)": [(JV, 1)],
    }
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    for r in range(config.rounds):
        for k, (name, targets) in enumerate(layouts.items()):
            counts = [0, 0]
            start = time.perf_counter()
            window = (start + config.warmup, start + config.warmup + config.seconds)
            await asyncio.gather(
                *(
                    _batches(
                        stub,
                        f"sbs-{r}-{k}-{s}",
                        targets[s % len(targets)][0],
                        targets[s % len(targets)][1],
                        frames[targets[s % len(targets)][0]].blocks(config.entries),
                        config.entries,
                        config.depth,
                        window,
                        counts,
                    )
                    for s in range(config.mux_streams)
                )
            )
            out.errors += counts[1]
            rates[name].append(counts[0] / config.seconds)
    out.side_by_side = {name: statistics.median(v) for name, v in rates.items()}


# -- the run ---------------------------------------------------------------------------------------


async def run(config: Config) -> Figures:
    from bench.machine import machine_info

    out = Figures(machine=str(machine_info().get("cpu", "")))
    with np.load(MODELS / BM / "samples.npz") as data:
        bm = Frames(data["x"])
    with np.load(MODELS / JV / "samples.npz") as data:
        jv = Frames(data["x"])
    with tempfile.TemporaryDirectory(prefix="seqserve-repo-bench-") as tmp:
        root = Path(tmp) / "repo"
        build_repository(root, config.versions + 1)
        args = ("--version-policy", "specific:1", "--max-sessions", "1000000")
        async with (
            repository_server(root, *args) as server,
            grpc.aio.insecure_channel(server.target, options=_OPTIONS) as channel,
        ):
            stub = pb_grpc.SeqServeStub(channel)
            await memory(stub, server, config, out)
            await latency(stub, server, bm, config, out)
            await stub.LoadModel(pb.LoadModelRequest(model=BM, version=2), timeout=120)
            await stub.LoadModel(pb.LoadModelRequest(model=JV, version=1), timeout=120)
            await side_by_side(stub, {BM: bm, JV: jv}, config, out)
    return out


def report(config: Config, out: Figures) -> str:
    per_version = out.rss_per_version_mib
    ratio = out.loading_p99_ms / out.steady_p99_ms if out.steady_p99_ms else float("nan")
    one = out.side_by_side.get("one model (basicmotions)", 0.0)
    lines = [
        f"model repository bench ({'quick' if config.quick else 'full'}; {out.machine})",
        "",
        "1. memory per loaded version (server VmRSS delta, idle version of basicmotions)",
        f"   base {out.rss_base_mib:.1f} MiB; per version: "
        + ", ".join(f"{d:+.1f}" for d in per_version)
        + (f" MiB (median {statistics.median(per_version):+.1f} MiB)" if per_version else ""),
        "",
        f"2. {config.sessions} streaming sessions (one frame per message), round trip",
        f"   steady:           p50 {out.steady_p50_ms:.2f} ms  p99 {out.steady_p99_ms:.2f} ms  "
        f"({out.steady_answers} answers, {out.steady_rate:,.0f}/s, server "
        f"{out.server_cpu.get('steady', 0):.2f} cores)",
        f"   during loads:     p50 {out.loading_p50_ms:.2f} ms  p99 {out.loading_p99_ms:.2f} ms  "
        f"({out.loading_answers} answers, {out.loading_rate:,.0f}/s, server "
        f"{out.server_cpu.get('loading', 0):.2f} cores)",
        f"   {out.loads} loads, "
        + (
            f"{statistics.median(out.load_seconds):.2f} s each (median)"
            if out.load_seconds
            else "none"
        )
        + f"; p99 ratio {ratio:.2f} (goal <= 2: {'PASS' if ratio <= 2 else 'MISS'}); "
        f"errors {out.errors}",
        "",
        f"3. side by side: {config.mux_streams} StreamBatch streams x {config.entries} sessions, "
        f"depth {config.depth}, median of {config.rounds}",
    ]
    for name, rate in out.side_by_side.items():
        lines.append(f"   {name:45s} {rate:>10,.0f} steps/s  ({rate / one:.2f} x one model)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    defaults = Config()
    for name in ("versions", "sessions", "entries", "mux_streams", "depth", "rounds"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("seconds", "warmup"):
        parser.add_argument("--" + name, type=float)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else defaults
    changes = {k: v for k, v in vars(args).items() if k not in ("quick", "json") and v is not None}
    return Config(**{**asdict(base), **changes}), args.json


def main(argv: list[str] | None = None) -> int:
    config, json_path = parse_args(argv)
    figures = asyncio.run(run(config))
    print(report(config, figures))
    if json_path is not None:
        json_path.write_text(json.dumps({"config": asdict(config), **asdict(figures)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
