"""Soak: many sessions streaming at a paced rate for a long time against a server subprocess.

    python -P bench/soak.py [--sessions 1000] [--seconds 600] [--streams 8] [--interval 1.0]

Sessions are spread over ``--streams`` Stream calls, each on its own connection. Every session
sends ``--frames-per-request`` frames of a samples.npz sequence every ``--interval`` seconds;
after ``--session-frames`` frames it ends (``end=true``) and its slot starts a new session, so
sessions churn all run long. Every answer is checked against an in-process solo run of the same
frames. When the time is up the slots stop without closing: those sessions must expire.

Recorded: errors (any error answer, wrong output, broken stream, unanswered request), p50/p99
step round trip after warm-up, the server's VmRSS, Threads and open fds after warm-up and at the
end of the load, and live sessions after ``--session-idle-timeout`` (from /metrics). Prints a
markdown table; exits 1 when a goal is missed (errors > 0, growth > ``--max-growth``, sessions
left live, session events that do not add up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from seqserve.proto import seqserve_pb2 as pb
from seqserve.proto import seqserve_pb2_grpc as pb_grpc
from seqserve.proto.codec import from_matrix, to_matrix

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # batched vs solo onnxruntime runs differ by ~1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss_kb": rss, "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _thread_names(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            names[Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()] += 1
    return names


def _scrape(port: int) -> dict[str, float]:
    """The metrics the soak reads, summed over models and versions: ``live``,
    ``event:<name>``, and ``le:<bound>`` (the Stream request-duration buckets)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "seqserve_live_sessions":
                key = "live"
            elif sample.name == "seqserve_session_events_total":
                key = f"event:{sample.labels['event']}"
            elif (
                sample.name == "seqserve_request_duration_seconds_bucket"
                and sample.labels.get("rpc") == "Stream"
                and sample.labels.get("protocol") == "native"
            ):
                key = f"le:{sample.labels['le']}"
            else:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return values


def _server_quantiles(
    before: dict[str, float], after: dict[str, float], qs: tuple[float, ...] = (0.5, 0.99)
) -> list[float]:
    """Upper bounds (ms) of the Stream request-duration buckets holding each quantile, over the
    requests between two scrapes: the server's own share of the round trip."""
    buckets = [
        (float(name[3:]), count - before.get(name, 0.0))
        for name, count in after.items()
        if name.startswith("le:")
    ]
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    return [
        next((le * 1000 for le, n in buckets if n >= q * total), float("nan"))
        if total
        else float("nan")
        for q in qs
    ]


@dataclass
class Slot:
    index: int
    generation: int = 0
    position: int = 0
    sample: int = 0


@dataclass
class Stats:
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    sent: int = 0
    sessions_started: int = 0

    def error(self, what: str) -> None:
        if len(self.errors) < 20:
            print(f"error: {what}", file=sys.stderr, flush=True)
        self.errors.append(what)


async def _stream(
    channel: grpc.aio.Channel,
    slots: list[Slot],
    xs: np.ndarray,
    expected: np.ndarray,
    args: argparse.Namespace,
    stats: Stats,
    warm_at: float,
    stop_at: float,
) -> None:
    stub = pb_grpc.SeqServeStub(channel)
    call = stub.Stream()
    loop = asyncio.get_running_loop()
    inflight: dict[int, tuple[float, int, int]] = {}  # tag -> (sent at, sample, position)
    sent_all = asyncio.Event()
    drained = asyncio.Event()

    async def read() -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            now = loop.time()
            entry = inflight.pop(response.tag, None)
            if entry is None:
                stats.error(f"answer with unknown tag {response.tag}")
                continue
            sent, sample, position = entry
            stats.answered += 1
            if sent >= warm_at:
                stats.latencies.append(now - sent)
            if response.HasField("error"):
                stats.error(
                    f"{response.session_id}@{position}: {response.error.reason} "
                    f"{response.error.message}"
                )
            elif response.position != position:
                stats.error(
                    f"{response.session_id}: answer for {response.position}, sent {position}"
                )
            else:
                got = from_matrix(response.probabilities)
                want = expected[sample, position : position + len(got)]
                if got.shape != want.shape or np.abs(got - want).max() > TOLERANCE:
                    stats.error(f"{response.session_id}@{position}: outputs differ from a solo run")
            if sent_all.is_set() and not inflight:
                drained.set()

    reader = asyncio.create_task(read())
    step = args.interval / len(slots)
    next_at = loop.time() + step * np.random.default_rng(slots[0].index).random()
    tag = 0
    try:
        while loop.time() < stop_at and not reader.done():
            for slot in slots:
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += step
                if loop.time() >= stop_at or reader.done():
                    break
                frames = xs[slot.sample, slot.position : slot.position + args.frames_per_request]
                end = slot.position + len(frames) >= args.session_frames
                sid = f"soak-{slot.index}-{slot.generation}"
                tag += 1
                inflight[tag] = (loop.time(), slot.sample, slot.position)
                if slot.position == 0:
                    stats.sessions_started += 1
                await call.write(
                    pb.StepRequest(
                        session_id=sid,
                        position=slot.position,
                        frames=to_matrix(frames),
                        start=slot.position == 0,
                        end=end,
                        tag=tag,
                    )
                )
                stats.sent += 1
                slot.position += len(frames)
                if end:
                    slot.generation += 1
                    slot.position = 0
                    slot.sample = (slot.sample + 1) % len(xs)
        sent_all.set()
        if inflight:
            try:
                await asyncio.wait_for(drained.wait(), 15)
            except TimeoutError:
                stats.error(f"{len(inflight)} requests unanswered 15 s after the load stopped")
        await call.done_writing()
        await asyncio.wait_for(reader, 15)
    except grpc.aio.AioRpcError as exc:
        stats.error(f"stream failed: {exc.code().name} {exc.details()}")
    except TimeoutError:
        stats.error("stream did not end within 15 s")
    finally:
        if not reader.done():
            reader.cancel()
            call.cancel()
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        exc = reader.exception()
        stats.error(f"stream failed: {exc!r}")


def _solo_outputs(model_dir: Path, xs: np.ndarray) -> np.ndarray:
    from seqserve.server.model import load_model_spec
    from seqserve.server.runtime import Runtime

    runtime = Runtime(load_model_spec(model_dir))
    out, _ = runtime.sequence(xs.astype(np.float32), runtime.zero_states(len(xs)))
    return np.asarray(out)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def soak(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    with np.load(model_dir / "samples.npz") as data:
        xs = np.asarray(data["x"][: args.samples], np.float32)
    args.session_frames = min(args.session_frames, xs.shape[1])
    expected = _solo_outputs(model_dir, xs)

    port, metrics_port = _free_port(), _free_port()
    log_fd, log_name = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
    server = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "seqserve.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--http-port",
            "-1",
            "--model-dir",
            str(model_dir),
            "--snapshot-path",
            "",
            "--snapshot-interval",
            "0",
            "--session-idle-timeout",
            str(args.session_idle_timeout),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_fd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    os.close(log_fd)
    stats = Stats()
    timeline: list[tuple[float, dict[str, int]]] = []
    rows: list[tuple[str, str, str, bool]] = []
    try:
        target = f"127.0.0.1:{port}"
        # One connection per stream: channels share a subchannel (one TCP connection) otherwise.
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(args.streams)
        ]
        await asyncio.wait_for(channels[0].channel_ready(), 60)
        # Warm every path before the start measures: a Predict runs in the inference worker
        # thread, which the executor creates lazily (small step batches run on the event loop).
        await pb_grpc.SeqServeStub(channels[0]).Predict(
            pb.PredictRequest(sequences=[pb.Sequence(frames=to_matrix(xs[0]))]), timeout=30
        )
        slots = [Slot(i, sample=i % len(xs)) for i in range(args.sessions)]
        loop = asyncio.get_running_loop()
        began = loop.time()
        warm_at = began + args.warmup
        stop_at = began + args.seconds
        tasks = [
            asyncio.create_task(
                _stream(
                    channels[k],
                    slots[k :: args.streams],
                    xs,
                    expected,
                    args,
                    stats,
                    warm_at,
                    stop_at,
                )
            )
            for k in range(min(args.streams, args.sessions))
        ]
        await asyncio.sleep(max(0.0, warm_at - loop.time()))
        start, start_names = _proc_stats(server.pid), _thread_names(server.pid)
        warm_metrics = await asyncio.to_thread(_scrape, metrics_port)

        async def sample() -> None:  # a trend tells a leak from a pool that grew once
            while True:
                await asyncio.sleep((stop_at - warm_at) / 10)
                timeline.append((loop.time() - began, _proc_stats(server.pid)))

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*tasks)
        sampler.cancel()
        end, end_names = _proc_stats(server.pid), _thread_names(server.pid)
        server_p50, server_p99 = _server_quantiles(
            warm_metrics, await asyncio.to_thread(_scrape, metrics_port)
        )
        elapsed = loop.time() - began
        for channel in channels:
            await channel.close()
        # Every slot stopped without closing: its session must expire, and only once.
        deadline = time.monotonic() + args.session_idle_timeout + 15
        metrics = await asyncio.to_thread(_scrape, metrics_port)
        while metrics.get("live", -1) != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            metrics = await asyncio.to_thread(_scrape, metrics_port)
        after = _proc_stats(server.pid)
        if server.poll() is not None:
            stats.error(f"server exited with {server.returncode}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)

    def event(name: str) -> float:
        return metrics.get(f"event:{name}", float("nan"))

    live = metrics.get("live", float("nan"))
    opened, closed, expired = event("opened"), event("closed"), event("expired")

    def growth(key: str) -> float:
        return (end[key] - start[key]) / start[key]

    rows.append(
        (
            "requests sent / answered",
            f"{stats.sent} / {stats.answered}",
            "all answered",
            stats.sent == stats.answered,
        )
    )
    rows.append(("errors", str(len(stats.errors)), "0", not stats.errors))
    rows.append(
        (
            "step round trip p50 / p99 (ms)",
            f"{_percentile(stats.latencies, 50):.2f} / {_percentile(stats.latencies, 99):.2f}",
            "reported",
            True,
        )
    )
    rows.append(
        (
            "server share p50 / p99 (ms, bucket upper bounds)",
            f"≤ {server_p50:.2f} / ≤ {server_p99:.2f}",
            "reported",
            True,
        )
    )
    for key, label, unit, scale in (
        ("rss_kb", "server VmRSS", "MiB", 1 / 1024),
        ("threads", "server threads", "", 1),
        ("fds", "server open fds", "", 1),
    ):
        g = growth(key)
        rows.append(
            (
                f"{label} start → end{f' ({unit})' if unit else ''}",
                f"{start[key] * scale:.1f} → {end[key] * scale:.1f} ({g:+.1%}); "
                f"after expiry {after[key] * scale:.1f}",
                f"< {args.max_growth:.0%} growth",
                g < args.max_growth,
            )
        )
    rows.append(("sessions started (client)", str(stats.sessions_started), "", True))
    rows.append(
        (
            "opened / closed / expired (server)",
            f"{opened:.0f} / {closed:.0f} / {expired:.0f}",
            "opened = closed + expired",
            opened == closed + expired,
        )
    )
    rows.append(("live sessions after expiry", f"{live:.0f}", "0", live == 0))

    print(
        f"\nsoak: {args.sessions} sessions, {args.streams} streams, {elapsed:.0f} s "
        f"({args.warmup:.0f} s warm-up), {args.frames_per_request} frame(s) every "
        f"{args.interval:g} s per session, {args.session_frames} frames per session, "
        f"idle timeout {args.session_idle_timeout:g} s\n"
    )
    print("| measure | value | goal | met |")
    print("|---|---|---|---|")
    for name, value, goal, met in rows:
        print(f"| {name} | {value} | {goal} | {'yes' if met or not goal else 'NO'} |")
    print(
        "\nserver over time (s: RSS MiB / threads / fds): "
        + ", ".join(
            f"{t:.0f}: {st['rss_kb'] / 1024:.1f} / {st['threads']} / {st['fds']}"
            for t, st in [(args.warmup, start), *timeline, (elapsed, end)]
        )
    )
    if end_names != start_names:
        print(
            f"\nserver threads started: {dict(end_names - start_names)}, "
            f"ended: {dict(start_names - end_names)}"
        )
    ok = all(met for *_, met in rows)
    if not ok:
        print(f"\nserver log: {log_name}")
    else:
        os.unlink(log_name)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--streams", type=int, default=8, help="Stream calls (connections)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between one session's requests"
    )
    parser.add_argument("--frames-per-request", type=int, default=1)
    parser.add_argument(
        "--session-frames",
        type=int,
        default=100,
        help="frames before a session ends and its slot starts a new one",
    )
    parser.add_argument("--samples", type=int, default=16, help="sequences of samples.npz used")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the start measures (default: 10 %% of the run, at most 30)",
    )
    parser.add_argument("--session-idle-timeout", type=float, default=5.0)
    parser.add_argument(
        "--max-growth",
        type=float,
        default=0.05,
        help="largest accepted RSS / threads / fds growth, as a fraction",
    )
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "basicmotions"))
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, args.seconds / 10)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
