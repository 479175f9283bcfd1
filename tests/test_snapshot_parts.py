"""Snapshot parts a server cannot restore (a version it lacks): how they age while it runs, and
that a malformed one never stops a server from starting or draining (it is written again as it
came). The end-to-end case, through real restarts: test_models_repository.py."""

from __future__ import annotations

import json

import numpy as np

from seqserve.server.snapshot import Part, age_part, waiting_sessions


def _part(idle: np.ndarray, **arrays: np.ndarray) -> Part:
    count = len(idle)
    header = {"model": "m", "version": "3", "fingerprint": "f" * 64, "sessions": count}
    values = {
        "ids": np.array([f"s{i}" for i in range(count)], "U128"),
        "positions": np.arange(count, dtype=np.int64) * 10,
        "idle": idle,
        "ring": np.zeros((count, 4, 2), np.float32),
        "state0": np.arange(count * 3, dtype=np.float32).reshape(count, 3),
        "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
        **arrays,
    }
    return Part("m", 3, "f" * 64, header, values)


def test_sessions_idle_past_the_timeout_leave_and_the_rest_age():
    part = _part(np.array([0.0, 5.0, 9.0, 2.0]))
    aged = age_part(part, 3.0, idle_timeout=10.0)
    assert aged is not None
    assert aged.arrays["ids"].tolist() == ["s0", "s1", "s3"]
    assert aged.arrays["idle"].tolist() == [3.0, 8.0, 5.0]
    assert aged.arrays["positions"].tolist() == [0, 10, 30]
    assert aged.arrays["state0"].tolist() == [[0, 1, 2], [3, 4, 5], [9, 10, 11]]
    assert aged.arrays["ring"].shape == (3, 4, 2)
    assert aged.header["sessions"] == 3
    assert json.loads(aged.arrays["header"].tobytes())["sessions"] == 3
    assert part.arrays["idle"].tolist() == [0.0, 5.0, 9.0, 2.0], "the original is left alone"
    assert age_part(aged, 100.0, idle_timeout=10.0) is None


def test_a_malformed_part_is_kept_as_it_came_and_read_with_zeros():
    for bad in (
        np.array(["a", "b"]),  # not numbers
        np.array([1.0, 2.0, 3.0]),  # not one per session
    ):
        part = _part(np.zeros(2))
        part.arrays["idle"] = bad
        assert age_part(part, 50.0, idle_timeout=10.0) is part
        assert [w[2] for w in waiting_sessions(part)] == [0.0, 0.0]
    part = _part(np.array([np.nan, 4.0]), positions=np.array(["x", "y"]))
    assert waiting_sessions(part) == [("s0", 0, 0.0), ("s1", 0, 4.0)]
    aged = age_part(part, 1.0, idle_timeout=10.0)  # NaN read as 0 here too
    assert aged is not None and aged.arrays["idle"].tolist() == [1.0, 5.0]
