"""What ``seqserve stream`` prints: a redrawn live view on a terminal, plain or JSON lines
otherwise, and the closing summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from .results import Prediction

__all__ = ["JsonLines", "LiveView", "PlainLines", "Progress", "View", "print_summary", "summary"]

_MAX_LINES = 12  # sessions shown one per line; more are folded into the last line


def _glyphs(out: TextIO) -> tuple[str, str, str, str, str]:
    """Bar full/empty, ellipsis, right/wrong: Unicode when the stream can encode it."""
    encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding.startswith("utf"):
        return "█", "░", "…", "✓", "✗"
    return "#", "-", "...", "ok", "WRONG"


@dataclass(slots=True)
class Progress:
    """One stream's state as the views show it."""

    name: str
    total: int
    truth: str | None = None
    done: int = 0
    label: str = ""
    confidence: float = 0.0
    latency: float = 0.0
    error: str = ""
    finished: bool = False
    session_id: str = ""
    model: str = ""
    version: int = 0  # the model version the session is pinned to
    latencies: list[float] = field(default_factory=list)


class View:
    """Base view: records progress; subclasses print it."""

    def __init__(self, out: TextIO, rows: list[Progress]) -> None:
        self.out = out
        self.rows = rows

    def step(self, row: Progress, prediction: Prediction) -> None:
        row.done = prediction.next_position
        row.version = prediction.model_version or row.version
        row.label = prediction.label
        row.confidence = prediction.confidence
        row.latency = prediction.latency
        row.latencies.append(prediction.latency)
        self.show(row, prediction)

    def show(self, row: Progress, prediction: Prediction) -> None:
        pass

    def close(self) -> None:
        pass


class PlainLines(View):
    def show(self, row: Progress, prediction: Prediction) -> None:
        self.out.write(
            f"{row.name} {row.done}/{row.total} {row.label} {row.confidence:.3f} "
            f"{row.latency * 1000:.1f}ms\n"
        )
        self.out.flush()


class JsonLines(View):
    def show(self, row: Progress, prediction: Prediction) -> None:
        record = {
            "source": row.name,
            "session_id": prediction.session_id,
            "position": prediction.position,
            "frames": prediction.frames,
            "total": row.total,
            "label": row.label,
            "confidence": round(row.confidence, 6),
            "probabilities": [round(float(p), 6) for p in prediction.probabilities[-1]],
            "latency_ms": round(row.latency * 1000, 3),
            "replayed": prediction.replayed,
            "model": prediction.model,
            "version": prediction.model_version,
        }
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


class LiveView(View):
    """A few lines redrawn in place with ANSI escapes (at most ~20 times a second)."""

    def __init__(self, out: TextIO, rows: list[Progress], interval: float = 0.05) -> None:
        super().__init__(out, rows)
        self.interval = interval
        self._glyphs = _glyphs(out)
        self._drawn = 0
        self._last = 0.0
        self.out.write("\x1b[?25l")  # hide the cursor while drawing

    def show(self, row: Progress, prediction: Prediction) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.draw()

    def draw(self) -> None:
        lines = [self._line(r) for r in self.rows[: _MAX_LINES - 1]]
        rest = self.rows[_MAX_LINES - 1 :]
        if len(rest) == 1:
            lines.append(self._line(rest[0]))
        elif rest:
            done = sum(r.done for r in rest)
            total = sum(r.total for r in rest)
            lines.append(f"{self._glyphs[2]} {len(rest)} more sessions: {done}/{total} frames")
        text = f"\x1b[{self._drawn}F" if self._drawn else ""
        text += "".join(f"\x1b[2K{line}\n" for line in lines)
        self._drawn = len(lines)
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self.draw()
        self.out.write("\x1b[?25h")
        self.out.flush()

    def _line(self, row: Progress, width: int = 20) -> str:
        filled = int(width * row.done / row.total) if row.total else width
        bar = self._glyphs[0] * filled + self._glyphs[1] * (width - filled)
        if row.error:
            state = f"\x1b[31merror: {row.error}\x1b[0m"
        else:
            label = f"\x1b[1m{row.label:<10}\x1b[0m" if row.label else " " * 10
            state = f"{label} {row.confidence:6.1%}  {row.latency * 1000:6.1f} ms"
        return f"{row.name:<12} {bar} {row.done:>4}/{row.total:<4} {state}"


def summary(rows: list[Progress], seconds: float, reconnects: int) -> dict[str, Any]:
    latencies = np.array([x for r in rows for x in r.latencies], dtype=np.float64)
    steps = sum(len(r.latencies) for r in rows)
    frames = sum(r.done for r in rows)
    known = [r for r in rows if r.truth is not None and r.finished]
    return {
        "sessions": [
            {
                "source": r.name,
                "session_id": r.session_id,
                "model": r.model,
                "version": r.version,
                "label": r.label,
                "confidence": round(r.confidence, 6),
                "truth": r.truth,
                "frames": r.done,
                "error": r.error or None,
            }
            for r in rows
        ],
        "frames": frames,
        "steps": steps,
        "seconds": round(seconds, 4),
        "steps_per_second": round(steps / seconds, 2) if seconds > 0 else None,
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)) * 1000, 3) if steps else None,
            "p99": round(float(np.percentile(latencies, 99)) * 1000, 3) if steps else None,
        },
        "correct": sum(r.label == r.truth for r in known) if known else None,
        "known": len(known) if known else None,
        "reconnects": reconnects,
    }


def print_summary(out: TextIO, report: dict[str, Any]) -> None:
    width = max(len(s["source"]) for s in report["sessions"])
    glyphs = _glyphs(out)
    for s in report["sessions"]:
        if s["error"]:
            line = f"error: {s['error']}"
        else:
            line = f"{s['label']} ({s['confidence']:.1%})"
            if s["truth"] is not None:
                mark = glyphs[3] if s["truth"] == s["label"] else glyphs[4]
                line += f"   true: {s['truth']} {mark}"
        out.write(f"{s['source']:<{width}}  {line}\n")
    lat = report["latency_ms"]
    rate = report["steps_per_second"]
    parts = [f"{report['steps']} steps ({report['frames']} frames) in {report['seconds']:.2f}s"]
    served = sorted({(s["model"], s["version"]) for s in report["sessions"] if s["model"]})
    if served:
        parts.insert(0, ", ".join(f"{m} v{v}" for m, v in served))
    if rate is not None:
        parts.append(f"{rate:.1f} steps/s")
    if lat["p50"] is not None:
        parts.append(f"latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
    if report["known"]:
        parts.append(f"{report['correct']}/{report['known']} correct")
    if report["reconnects"]:
        parts.append(f"{report['reconnects']} reconnects")
    out.write("; ".join(parts) + "\n")
    out.flush()
