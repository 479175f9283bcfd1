"""What one suite run measured, as plain data: the report and the plots read it, and it is saved
next to them as ``results.json``."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .clients import Run
from .limits import OrtPoint

__all__ = ["Results", "Summary"]


@dataclass(frozen=True, slots=True)
class Summary:
    """One network run at one load (sessions, entries per message or clients)."""

    load: int
    p50_ms: float
    p99_ms: float
    rate: float  # steps (frames answered) per second
    steps: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @classmethod
    def of(cls, load: int, runs: list[Run]) -> Summary:
        """Medians over repeated runs at one load (steps and seconds add up)."""

        def median(values: list[float]) -> float:
            return statistics.median(values)

        return cls(
            load,
            median([r.p50 for r in runs]),
            median([r.p99 for r in runs]),
            median([r.rate for r in runs]),
            sum(r.steps for r in runs),
            sum(r.seconds for r in runs),
            median([r.client_cpu for r in runs]),
            median([r.server_cpu for r in runs]),
        )


@dataclass
class Results:
    config: dict[str, Any]
    machine: dict[str, str] = field(default_factory=dict)
    ort: list[OrtPoint] = field(default_factory=list)
    echo_stream: list[Summary] = field(default_factory=list)
    stream: list[Summary] = field(default_factory=list)
    floor_stream: list[Summary] = field(default_factory=list)  # bench/floor_server.py
    echo_mux: list[Summary] = field(default_factory=list)
    mux: list[Summary] = field(default_factory=list)
    mux_status: str = "not run"  # "ok", or why there are no seqserve figures
    predict_server_s: list[float] = field(default_factory=list)  # per 1,024 x 100 Predict call
    predict_inprocess_s: list[float] = field(default_factory=list)  # same data, chunks
    predict_whole_s: list[float] = field(default_factory=list)  # same data, one call
    keras: dict[str, Any] = field(default_factory=dict)  # 5(a); {"error": ...} when not run
    window: list[Summary] = field(default_factory=list)  # 5(b), load = clients
    memory: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # scenario -> error

    # -- lookups the report and the plots share --------------------------------------------

    def ort_at(self, graph: str, batch: int) -> OrtPoint | None:
        return next((p for p in self.ort if p.graph == graph and p.batch == batch), None)

    def ort_ceiling(self, graph: str = "step") -> OrtPoint | None:
        points = [p for p in self.ort if p.graph == graph]
        return max(points, key=lambda p: p.rate) if points else None

    @staticmethod
    def at(rows: list[Summary], load: int) -> Summary | None:
        return next((r for r in rows if r.load == load), None)

    @property
    def predict_steps(self) -> int:
        return int(self.config["predict_sequences"]) * int(self.config["predict_steps"])

    @staticmethod
    def median(times: list[float]) -> float | None:
        return statistics.median(times) if times else None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
