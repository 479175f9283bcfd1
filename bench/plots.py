"""PNG plots of a run: latency percentiles and throughput vs. concurrency, the onnxruntime batch
curve. matplotlib is optional (``seqserve[bench]``, also in ``dev``): without it, no plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .results import Results, Summary

__all__ = ["write_plots"]


def _xy(rows: list[Summary], value: str) -> tuple[list[int], list[float]]:
    return [r.load for r in rows], [getattr(r, value) for r in rows]


def _latency(plt: Any, r: Results, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rows, name, color in (
        (r.echo_stream, "echo", "tab:gray"),
        (r.floor_stream, "floor", "tab:purple"),
        (r.stream, "seqserve", "tab:blue"),
    ):
        if not rows:
            continue
        for value, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            ax.plot(*_xy(rows, value), style, color=color, label=f"{name} {value.split('_')[0]}")
    if r.window:
        ax.plot(
            *_xy(r.window, "p50_ms"),
            "-^",
            color="tab:red",
            label=f"stateless Predict, window {r.config['window']}, p50",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions (one stream each)",
        ylabel="round trip, ms",
        title="One frame per message: latency vs. concurrency",
    )
    _save(plt, fig, ax, path)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(plt: Any, r: Results, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*_xy(r.echo_stream, "rate"), "-o", color="tab:gray", label="echo, 1 frame per message")
    if r.floor_stream:
        ax.plot(
            *_xy(r.floor_stream, "rate"),
            "-o",
            color="tab:purple",
            label="floor (transport + one step per message), 1 frame per message",
        )
    ax.plot(*_xy(r.stream, "rate"), "-o", color="tab:blue", label="seqserve, 1 frame per message")
    streams = int(r.config["mux_streams"])
    for rows, name, color in ((r.echo_mux, "echo", "tab:gray"), (r.mux, "seqserve", "tab:green")):
        if rows:
            ax.plot(
                [s.load * streams for s in rows],
                [s.rate for s in rows],
                "D",
                color=color,
                markersize=8,
                label=f"{name}, StreamBatch ({streams} streams)",
            )
    ceiling = r.ort_ceiling("step")
    if ceiling:
        ax.axhline(
            ceiling.rate,
            color="tab:orange",
            linestyle=":",
            label=f"in-process onnxruntime ceiling (batch {ceiling.batch})",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sessions",
        ylabel="steps/s",
        title="Throughput vs. concurrency",
    )
    _save(plt, fig, ax, path)


def _onnxruntime(plt: Any, r: Results, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for graph, label in (("step", "step graph"), ("sequence", "sequence graph, T=1")):
        points = [p for p in r.ort if p.graph == graph]
        left.plot([p.batch for p in points], [p.rate for p in points], "-o", label=label)
        right.plot([p.batch for p in points], [p.seconds * 1e6 for p in points], "-o", label=label)
    left.set(ylabel="steps/s", title="In-process onnxruntime: steps/s")
    right.set(ylabel="µs per call", title="In-process onnxruntime: time per call")
    for ax in (left, right):
        ax.set(xscale="log", yscale="log", xlabel="batch (sessions per call)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(r: Results, out: Path) -> list[tuple[str, str]]:
    """(title, file name) of each PNG written into ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, title, draw, needed in (
        ("latency.png", "latency vs concurrency", _latency, r.stream or r.echo_stream),
        ("throughput.png", "throughput vs concurrency", _throughput, r.stream or r.echo_stream),
        ("onnxruntime.png", "onnxruntime batch curve", _onnxruntime, r.ort),
    ):
        if needed:
            draw(plt, r, out / name)
            written.append((title, name))
    return written
