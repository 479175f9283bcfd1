"""The soak bench, 30 seconds of it: 200 sessions streaming and churning over 8 connections, then
left to expire. No errors, every session freed, and the server's memory, threads and open files
grow by less than 20 % (lenient: 30 s leaves little time to see a leak, and a single extra gRPC
thread on ~11 is already 9 %; the full 1,000 x 600 s run holds them to 5 %)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_thirty_second_soak_has_no_errors_and_frees_every_session(model_dir):
    run = subprocess.run(
        [
            sys.executable,
            "-P",
            str(BENCH),
            "--seconds",
            "30",
            "--sessions",
            "200",
            "--streams",
            "8",
            "--interval",
            "0.25",
            "--session-frames",
            "40",
            "--warmup",
            "5",
            "--session-idle-timeout",
            "3",
            "--max-growth",
            "0.20",
            "--model-dir",
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(run.stdout)
    table = dict(
        line.strip("|").split("|")[:2]
        for line in run.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| measure")
    )
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["errors"] == "0", run.stderr[-3000:]
    assert table["live sessions after expiry"] == "0"
    sent, answered = table["requests sent / answered"].split(" / ")
    assert int(sent) == int(answered) > 12_000  # 200 sessions x 4/s x 30 s: 24,000 if on pace
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
