"""REPORT.md: the targets (ratios from this run), one table per scenario, machine and method."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .results import Results, Summary

__all__ = ["Target", "targets", "write_report"]

MUX_TARGET = 100_000  # steps/s, P3
IDLE_BYTES_TARGET = 4096  # per idle session beyond its state, P5


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    claim: str
    measured: str
    ratio: float | None
    goal: str
    passed: bool | None  # None: not measured in this run


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


_NUMBER = re.compile(r"[\d,]+(\.\d+)?|—")


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table; columns holding only numbers are right-aligned."""
    cells = [list(row) for row in rows]
    align = [
        "---:" if cells and all(_NUMBER.fullmatch(row[i]) for row in cells) else "---"
        for i in range(len(head))
    ]
    return [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(row) + " |" for row in cells),
        "",
    ]


def _common_load(a: list[Summary], b: list[Summary], wanted: int) -> int | None:
    loads = {r.load for r in a} & {r.load for r in b}
    if wanted in loads:
        return wanted
    return max(loads) if loads else None


def _keras_ms(r: Results) -> list[float]:
    return [t * 1e3 for t in r.keras.get("latencies_s", [])]


def targets(r: Results) -> list[Target]:
    out = []
    s1, e1, step = Results.at(r.stream, 1), Results.at(r.echo_stream, 1), r.ort_at("step", 1)
    claim = "one session, one frame per message: p50 ≤ 1.25 x (echo p50 + in-process step)"
    if s1 and e1 and step:
        bound = e1.p50_ms + step.seconds * 1e3
        ratio = s1.p50_ms / bound
        out.append(
            Target(
                "P1",
                claim,
                f"{_ms(s1.p50_ms)} ms vs {_ms(e1.p50_ms)} + {_ms(step.seconds * 1e3)} ms",
                ratio,
                "≤ 1.25",
                ratio <= 1.25,
            )
        )
    else:
        out.append(Target("P1", claim, "not measured", None, "≤ 1.25", None))

    load = _common_load(r.stream, r.echo_stream, 128)
    claim = f"{load or 128} sessions: steps/s ≥ 0.8 x echo messages/s"
    seq, echo = Results.at(r.stream, load or 0), Results.at(r.echo_stream, load or 0)
    if seq and echo:
        ratio = seq.rate / echo.rate
        out.append(
            Target("P2", claim, f"{_n(seq.rate)} vs {_n(echo.rate)}", ratio, "≥ 0.8", ratio >= 0.8)
        )
    else:
        out.append(Target("P2", claim, "not measured", None, "≥ 0.8", None))

    ceiling = r.ort_ceiling("step")
    claim = "multiplexed: ≥ 100 k steps/s and ≥ 50 % of the in-process batched ceiling"
    goal = "≥ 0.5 and ≥ 100,000/s"
    if r.mux and ceiling:
        best = max(r.mux, key=lambda s: s.rate)
        ratio = best.rate / ceiling.rate
        out.append(
            Target(
                "P3",
                claim,
                f"{_n(best.rate)} steps/s ({best.load} per message) vs "
                f"ceiling {_n(ceiling.rate)} (step graph, batch {ceiling.batch})",
                ratio,
                goal,
                ratio >= 0.5 and best.rate >= MUX_TARGET,
            )
        )
    else:
        out.append(Target("P3", claim, f"seqserve: {r.mux_status}", None, goal, None))

    server, inproc = Results.median(r.predict_server_s), Results.median(r.predict_inprocess_s)
    claim = "batch RPC (Predict) ≥ 0.8 x in-process onnxruntime, same data"
    if server and inproc:
        ratio = inproc / server
        out.append(
            Target(
                "P4",
                claim,
                f"{_n(r.predict_steps / server)} vs {_n(r.predict_steps / inproc)} steps/s",
                ratio,
                "≥ 0.8",
                ratio >= 0.8,
            )
        )
    else:
        out.append(Target("P4", claim, "not measured", None, "≥ 0.8", None))

    mem = _memory(r)
    claim = "≤ 4 KB resident per idle session beyond its state"
    if mem:
        beyond = mem["beyond"]
        out.append(
            Target(
                "P5",
                claim,
                f"{_n(beyond)} B beyond {_n(mem['state'])} B of state "
                f"({mem['sessions']:,} sessions)",
                beyond / IDLE_BYTES_TARGET,
                "≤ 1 (of 4,096 B)",
                beyond <= IDLE_BYTES_TARGET,
            )
        )
    else:
        out.append(Target("P5", claim, "not measured", None, "≤ 1 (of 4,096 B)", None))

    keras = _keras_ms(r)
    claim = "≥ 20x faster per step than Keras predict on a sliding window"
    if keras and s1:
        ratio = statistics.median(keras) / s1.p50_ms
        out.append(
            Target(
                "P6",
                claim,
                f"{_ms(statistics.median(keras))} ms vs {_ms(s1.p50_ms)} ms (p50)",
                ratio,
                "≥ 20",
                ratio >= 20,
            )
        )
    else:
        out.append(Target("P6", claim, r.keras.get("error", "not measured"), None, "≥ 20", None))
    return out


def _memory(r: Results) -> dict[str, float] | None:
    m = r.memory
    if not m:
        return None
    n = m["sessions"]
    return {
        "sessions": n,
        "state": m["state_bytes"],
        "ring": m["ring_bytes"],
        "book": (m["rss_opened"] - m["rss_empty"]) / n,
        "stepped": (m["rss_stepped"] - m["rss_opened"]) / n,
        "total": (m["rss_stepped"] - m["rss_empty"]) / n,
        "beyond": (m["rss_stepped"] - m["rss_empty"]) / n - m["state_bytes"],
    }


# -- sections ----------------------------------------------------------------------------------


def _targets_section(r: Results) -> list[str]:
    verdict = {True: "PASS", False: "MISS", None: "n/a"}
    rows = [
        (
            t.name,
            t.claim,
            t.measured,
            "—" if t.ratio is None else f"{t.ratio:.2f}",
            t.goal,
            f"**{verdict[t.passed]}**",
        )
        for t in targets(r)
    ]
    return [
        "## Targets (ratios from this run)",
        "",
        *_table(("target", "claim", "measured", "ratio", "goal", "result"), rows),
        *_floor_lines(r),
    ]


def _floor_lines(r: Results) -> list[str]:
    """P1 and P2 as the floor server (section 2) scores them in the same run: how far the
    goals are from what the transport plus one model step per message allows."""
    parts = []
    f1, e1, step = Results.at(r.floor_stream, 1), Results.at(r.echo_stream, 1), r.ort_at("step", 1)
    if f1 and e1 and step:
        ratio = f1.p50_ms / (e1.p50_ms + step.seconds * 1e3)
        parts.append(f"P1 {ratio:.2f} (p50 {_ms(f1.p50_ms)} ms)")
    load = _common_load(r.floor_stream, r.echo_stream, 128)
    f, e = Results.at(r.floor_stream, load or 0), Results.at(r.echo_stream, load or 0)
    if f and e:
        parts.append(f"P2 {f.rate / e.rate:.2f} ({_n(f.rate)} steps/s at {load} sessions)")
    if not parts:
        return []
    return [
        "The floor of section 2 (the transport plus one onnxruntime step per message, nothing "
        f"else) scores, in this run: {'; '.join(parts)}.",
        "",
    ]


def _limits_section(r: Results) -> list[str]:
    lines = [
        "## 1. Limits",
        "",
        "In-process onnxruntime with the server's `Runtime` (1 intra-op thread, no "
        "spinning): per-call time and steps/s of the step graph and of the sequence graph "
        "at T=1.",
        "",
    ]
    rows = []
    for batch in sorted({p.batch for p in r.ort}):
        row = [str(batch)]
        for graph in ("step", "sequence"):
            p = r.ort_at(graph, batch)
            row += [_n(p.seconds * 1e6, 1), _n(p.rate)] if p else ["—", "—"]
        rows.append(row)
    lines += _table(
        (
            "batch",
            "step graph µs/call",
            "step graph steps/s",
            "sequence graph µs/call",
            "sequence graph steps/s",
        ),
        rows,
    )
    lines += [
        "Bare `grpc.aio` echo server (canned answers of the same shape), driven by the "
        "same client with the same messages and concurrency as the seqserve runs below: "
        "the transport's ceiling.",
        "",
    ]
    streams = int(r.config["mux_streams"])
    runs = [("Stream, 1 frame per message", 1, s.load, s) for s in r.echo_stream]
    runs += [
        (f"StreamBatch, {s.load} sessions per message", s.load, s.load * streams, s)
        for s in r.echo_mux
    ]
    rows = [
        [
            what,
            str(per),
            str(sessions),
            _ms(s.p50_ms),
            _ms(s.p99_ms),
            _n(s.rate / per),
            _n(s.rate),
            f"{s.client_cpu:.2f}",
            f"{s.server_cpu:.2f}",
        ]
        for what, per, sessions, s in runs
    ]
    lines += _table(
        (
            "echo run",
            "per message",
            "sessions",
            "p50 ms",
            "p99 ms",
            "messages/s",
            "steps/s",
            "client cores",
            "server cores",
        ),
        rows,
    )
    return lines


def _stream_section(r: Results) -> list[str]:
    rows = []
    for s in r.stream:
        e = Results.at(r.echo_stream, s.load)
        f = Results.at(r.floor_stream, s.load)
        rows.append(
            (
                str(s.load),
                _ms(s.p50_ms),
                _ms(s.p99_ms),
                _n(s.rate),
                _ms(e.p50_ms) if e else "—",
                _n(e.rate) if e else "—",
                f"{s.rate / e.rate:.2f}" if e else "—",
                _ms(f.p50_ms) if f else "—",
                _n(f.rate) if f else "—",
                f"{s.client_cpu:.2f}",
                f"{s.server_cpu:.2f}",
            )
        )
    return [
        "## 2. Streaming: one frame per message",
        "",
        "Each session on its own `Stream` call (one channel), sending one frame and "
        "awaiting its answer before the next. The floor is `bench/floor_server.py`: a bare "
        "`grpc.aio` `Stream` that keeps each session's states in a dict and runs the step "
        "graph right in the handler, one message at a time, with nothing else (no batching, "
        "positions, checks or metrics): what any Python server of this transport and model pays "
        "per message.",
        "",
        *_table(
            (
                "sessions",
                "p50 ms",
                "p99 ms",
                "steps/s",
                "echo p50 ms",
                "echo msg/s",
                "steps/s ÷ echo",
                "floor p50 ms",
                "floor steps/s",
                "client cores",
                "server cores",
            ),
            rows,
        ),
    ]


def _mux_section(r: Results) -> list[str]:
    c = r.config
    ceiling = r.ort_ceiling("step")
    lines = [
        "## 3. Multiplexed: many sessions per message",
        "",
        f"`StreamBatch`: {c['mux_streams']} streams, each message one frame for each of the "
        f"stream's own sessions, {c['mux_depth']} messages in flight per stream; latency is "
        "per message. In-process ceiling: the best step-graph steps/s of section 1"
        + (f" ({_n(ceiling.rate)}, batch {ceiling.batch})." if ceiling else "."),
        "",
    ]
    rows = []
    for entries in c["mux_entries"]:
        s, e = Results.at(r.mux, entries), Results.at(r.echo_mux, entries)
        seq_cells = (_ms(s.p50_ms), _ms(s.p99_ms), _n(s.rate)) if s else (r.mux_status, "—", "—")
        rows.append(
            (
                str(entries),
                str(c["mux_streams"]),
                str(c["mux_depth"]),
                str(entries * c["mux_streams"]),
                *seq_cells,
                _n(e.rate) if e else "—",
                f"{s.rate / e.rate:.2f}" if s and e else "—",
                f"{s.rate / ceiling.rate:.2f}" if s and ceiling else "—",
                f"{s.server_cpu:.2f}" if s else "—",
            )
        )
    lines += _table(
        (
            "per message",
            "streams",
            "in flight",
            "sessions",
            "p50 ms",
            "p99 ms",
            "steps/s",
            "echo steps/s",
            "÷ echo",
            "÷ in-process ceiling",
            "server cores",
        ),
        rows,
    )
    return lines


def _predict_section(r: Results) -> list[str]:
    c = r.config
    server, inproc = Results.median(r.predict_server_s), Results.median(r.predict_inprocess_s)
    whole = Results.median(r.predict_whole_s)
    n, t = c["predict_sequences"], c["predict_steps"]
    rows = []
    for what, seconds, count in (
        (f"seqserve `Predict`, one call of {n} sequences", server, r.predict_server_s),
        (
            "in-process onnxruntime, sequence graph, 256 per call (as Predict runs them)",
            inproc,
            r.predict_inprocess_s,
        ),
        (f"in-process onnxruntime, sequence graph, {n} in one call", whole, r.predict_whole_s),
    ):
        if seconds:
            rows.append(
                (
                    what,
                    str(len(count)),
                    f"{seconds * 1e3:,.1f}",
                    _n(r.predict_steps / seconds),
                    f"{inproc / seconds:.2f}" if inproc else "—",
                )
            )
    return [
        f"## 4. Batch RPC: {n:,} sequences x {t} steps",
        "",
        "Whole sequences from zero state, final probabilities only. Each round makes one "
        "`Predict` call, then the same work in process (this client's process, the "
        "server's `Runtime` options); after one warm-up round, medians.",
        "",
        *_table(("how", "repeats", "ms per pass", "steps/s", "÷ in-process (256/call)"), rows),
    ]


def _today_section(r: Results) -> list[str]:
    c = r.config
    width = c["window"]
    stream1 = Results.at(r.stream, 1)
    rows = []
    keras = _keras_ms(r)
    if keras:
        p50 = statistics.median(keras)
        rows.append(
            (
                f"(a) Keras `model.predict` on the last {width} frames, after every frame",
                "1",
                _ms(p50),
                _ms(float(sorted(keras)[int(0.99 * (len(keras) - 1))])),
                _n(1e3 / statistics.mean(keras), 1),
                f"{p50 / stream1.p50_ms:.1f}" if stream1 else "—",
            )
        )
    for s in r.window:
        rows.append(
            (
                f"(b) stateless: `Predict` on the last {width} frames, every frame",
                str(s.load),
                _ms(s.p50_ms),
                _ms(s.p99_ms),
                _n(s.rate),
                f"{s.p50_ms / stream1.p50_ms:.1f}" if stream1 else "—",
            )
        )
    for load in c["window_clients"]:
        ref = Results.at(r.stream, load)
        if ref:
            rows.append(
                (
                    "seqserve `Stream`, one frame per message (section 2)",
                    str(load),
                    _ms(ref.p50_ms),
                    _ms(ref.p99_ms),
                    _n(ref.rate),
                    f"{ref.p50_ms / stream1.p50_ms:.1f}" if stream1 else "—",
                )
            )
    lines = [
        "## 5. How people do it today",
        "",
        f"(a) the usual tutorial pattern, {len(keras) or c['keras_steps']} timed steps "
        "(TensorFlow in its own process); (b) what a stateless server (TF Serving, "
        "MLServer) forces: the client keeps the window and sends all of it every step, "
        "emulated with seqserve's own `Predict`. Last column: per-step p50 over seqserve's "
        "one-session streaming p50.",
        "",
    ]
    if r.keras.get("error"):
        lines += [f"(a) not run: {r.keras['error']}", ""]
    lines += _table(
        ("approach", "clients", "p50 ms per step", "p99 ms", "steps/s", "x seqserve p50"), rows
    )
    return lines


def _memory_section(r: Results) -> list[str]:
    mem = _memory(r)
    lines = ["## 6. Memory per idle session", ""]
    if not mem:
        return [*lines, "not measured", ""]
    m = r.memory
    sizes = m.get("object_sizes", {})
    mib = 2**20
    lines += [
        "The server's engine in a process of its own, `--max-sessions` = sessions: VmRSS "
        "before any session, after opening them all (session table only), and after each "
        "took one step (state rows and the first replay-ring row written). Per session: "
        "the deltas divided by the session count. The replay ring "
        f"(`--replay-window` {m['replay_window']} x classes x 4 B) is part of the stepped "
        "delta and shown apart.",
        "",
        *_table(
            (
                "sessions",
                "RSS empty MiB",
                "opened MiB",
                "stepped MiB",
                "table B/session",
                "state + ring B/session",
                "total B/session",
                "state_bytes",
                "ring B",
                "beyond state B",
            ),
            [
                (
                    f"{mem['sessions']:,}",
                    f"{m['rss_empty'] / mib:.1f}",
                    f"{m['rss_opened'] / mib:.1f}",
                    f"{m['rss_stepped'] / mib:.1f}",
                    _n(mem["book"]),
                    _n(mem["stepped"]),
                    _n(mem["total"]),
                    _n(mem["state"]),
                    _n(mem["ring"]),
                    _n(mem["beyond"]),
                )
            ],
        ),
    ]
    if sizes:
        lines += [
            "Python objects per session (`sys.getsizeof`): "
            + ", ".join(f"{k.replace('_', ' ')} {v} B" for k, v in sizes.items())
            + "; plus the table's "
            "dict entries.",
            "",
        ]
    return lines


def _machine_section(r: Results, plots: list[tuple[str, str]]) -> list[str]:
    c = r.config
    lines = ["## Plots", ""]
    if plots:
        lines += [f"![{title}]({name})" for title, name in plots] + [""]
    else:
        lines += ["not drawn: matplotlib is not installed (`pip install -e .[bench]`)", ""]
    lines += [
        "## Machine and method",
        "",
        *_table(("", "value"), ((k, v) for k, v in r.machine.items())),
        f"Each network run: {c['warmup']} s warm-up, then a {c['seconds']} s window; only "
        "answers arriving inside it count. Client and servers are separate processes on "
        'the same machine; "cores" columns are CPU time over wall time in the window '
        f"(1.00 = one core busy). At each load echo and seqserve runs alternate, "
        f"{c.get('rounds', 1)} of each; the tables show medians over them. Figures are "
        "comparable within this run only.",
        "",
    ]
    if r.failures:
        lines += ["## Failures", "", *(f"- {k}: {v}" for k, v in r.failures.items()), ""]
    return lines


def write_report(r: Results, path: Path, plots: list[tuple[str, str]]) -> None:
    mode = "quick (smoke) run" if r.config.get("quick") else "full run"
    lines = [
        "# seqserve benchmarks",
        "",
        f"`python -P bench/suite.py{' --quick' if r.config.get('quick') else ''}`: "
        f"{mode}, {r.machine.get('date', '')}, {r.machine.get('cores', '')} cores "
        f"({r.machine.get('cpu', '')}); seqserve-server with its defaults"
        + (f" and `{r.config['server_args']}`" if r.config.get("server_args") else "")
        + ".",
        "",
        *_targets_section(r),
        *_limits_section(r),
        *_stream_section(r),
        *_mux_section(r),
        *_predict_section(r),
        *_today_section(r),
        *_memory_section(r),
        *_machine_section(r, plots),
    ]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
