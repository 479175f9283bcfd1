"""The benchmark suite keeps working: its quick mode, shrunk further, runs every scenario into a
temporary folder; the report has each scenario's table with positive figures, results.json agrees,
and the plots are PNG files. Nothing about speed is asserted (the targets' PASS/MISS are only
recorded)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "bench" / "suite.py"
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Targets",
    "## 1. Limits",
    "## 2. Streaming",
    "## 3. Multiplexed",
    "## 4. Batch RPC",
    "## 5. How people do it today",
    "## 6. Memory",
)
NUMBER = re.compile(r"-?[\d,]+(\.\d+)?")


def _tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table in a section."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip().strip("*") for c in row.strip("|").split("|")])
            tables.append((head, rows))
    return tables


def test_quick_suite_writes_every_table_and_plot(tmp_path, model_dir):
    run = subprocess.run(
        [
            sys.executable,
            "-P",
            str(SUITE),
            "--quick",
            "--out",
            str(tmp_path),
            "--model-dir",
            str(model_dir),
            "--seconds",
            "0.3",
            "--warmup",
            "0.2",
            "--concurrency",
            "1",
            "4",
            "--mux-entries",
            "8",
            "--mux-streams",
            "2",
            "--ort-batches",
            "1",
            "8",
            "--ort-budget",
            "0.05",
            "--predict-sequences",
            "16",
            "--predict-steps",
            "20",
            "--window",
            "20",
            "--keras-steps",
            "2",
            "--memory-sessions",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in re.split(r"\n(?=## )", report)}
    for title in SECTIONS:
        section = next((s for head, s in sections.items() if head.startswith(title)), None)
        assert section is not None, f"no section {title!r} in\n{report}"
        tables = _tables(section)
        assert tables and all(rows for _, rows in tables), f"{title}: no table rows"
        figures = 0
        for head, rows in tables:
            for row in rows:
                assert len(row) == len(head), f"{title}: ragged row {row}"
                for column, cell in zip(head, row, strict=True):
                    if "cores" in column or not NUMBER.fullmatch(cell):
                        continue  # CPU shares may round to 0 in a 0.3 s window
                    assert float(cell.replace(",", "")) > 0, f"{title}: {column} = {cell}"
                    figures += 1
        assert figures, f"{title}: no figures"

    targets = {row[0]: row for row in _tables(sections["## Targets (ratios from this run)"])[0][1]}
    assert sorted(targets) == ["P1", "P2", "P3", "P4", "P5", "P6"]
    measured = {"P1", "P2", "P4", "P5"}
    if importlib.util.find_spec("tensorflow") is not None:
        measured.add("P6")
    for name in measured:
        assert targets[name][-1] in ("PASS", "MISS"), targets[name]

    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["failures"]
    assert [s["load"] for s in results["stream"]] == [1, 4]
    assert [s["load"] for s in results["floor_stream"]] == [1, 4]
    streams = results["stream"] + results["echo_stream"] + results["floor_stream"]
    for summary in streams + results["echo_mux"]:
        assert summary["rate"] > 0 and 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert results["mux"] or results["mux_status"].startswith("not implemented")
    assert results["memory"]["rss_stepped"] > results["memory"]["rss_empty"] > 0

    for name in ("latency.png", "throughput.png", "onnxruntime.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in report
