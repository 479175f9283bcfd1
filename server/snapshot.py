"""Save every live session to one file on drain and restore it at start.

The file is an ``.npz`` (zip: per-member CRCs catch corruption and truncation) holding a JSON
header, the ids, owners (principals) and positions, each state tensor and the replay ring. Format 2
added the owners; format-1 files still load, every session owned by "" (the principal of a server
without authentication: with authentication on, nobody can reach them and they expire). It is
written to a temporary name and renamed, so a crash mid-write never leaves a half file under the
real name. Loading checks everything before touching the session table: a corrupt, truncated or
foreign file is refused whole. The header says whether the file was written by a drain (``clean``:
nothing was applied after it) or periodically (a crash may have lost frames after it); sessions
restored from the latter report ``rolled_back`` until they move on.

One file belongs to one server: ``lock_snapshot`` holds an exclusive lock on ``<file>.lock``
for the server's life, so a second server given the same file refuses to start instead of
restoring the same sessions and overwriting the first one's saves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import SnapshotError
from .model import ModelSpec
from .sessions import SessionTable

__all__ = [
    "Part",
    "age_part",
    "capture",
    "capture_parts",
    "load_snapshot",
    "lock_snapshot",
    "read_parts",
    "restore_part",
    "save_snapshot",
    "waiting_sessions",
    "write_snapshot",
]

log = logging.getLogger("seqserve.snapshot")

FORMAT = "seqserve-snapshot/2"
_READABLE = (FORMAT, "seqserve-snapshot/1")  # /1: no owners
# /3: several parts, one per model version (the sessions pinned to it), each a /2 payload.
MULTI = "seqserve-snapshot/3"
_PART_ARRAYS = ("ids", "owners", "positions", "idle", "ring")


def lock_snapshot(path: str | Path) -> IO[str]:
    """Lock the snapshot file for this process (until the returned file is closed, or the
    process ends however it ends); SnapshotError if another process holds it."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SnapshotError(
            f"snapshot file {path} is in use by another seqserve server ({holder}, lock "
            f"{lock_path}); give each server its own --snapshot-path"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def save_snapshot(path: str | Path, spec: ModelSpec, table: SessionTable) -> int:
    """Write all live sessions; returns how many."""
    arrays = capture(spec, table)
    write_snapshot(path, arrays)
    return len(arrays["ids"])


def capture(spec: ModelSpec, table: SessionTable, *, clean: bool = False) -> dict[str, np.ndarray]:
    """Copies of every live session's state, position and replay window. Call on the event loop:
    states and positions change together there, so the copy is consistent even while a batch
    runs in the worker thread (its results are not applied yet, so they are not in it).
    ``clean``: taken by a drain, with nothing running and nothing to run after it."""
    sessions = list(table)
    slots = np.array([s.slot for s in sessions], np.intp)
    bank = table.bank
    now = table.clock()
    header = {
        "format": FORMAT,
        "model": spec.name,
        "version": spec.version,
        "fingerprint": spec.fingerprint,
        "states": [[s.name, s.size] for s in spec.states],
        "window": bank.window,
        "sessions": len(sessions),
        "created": time.time(),
        "clean": clean,
    }
    arrays: dict[str, np.ndarray] = {
        "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
        "ids": np.array([s.id for s in sessions], dtype="U128"),
        "owners": np.array([s.owner for s in sessions], dtype="U128"),
        "positions": np.array([s.position for s in sessions], np.int64),
        "idle": np.array([now - s.last_used for s in sessions], np.float64),
        "ring": bank.ring[slots],
    }
    for i, slab in enumerate(bank.slabs):
        arrays[f"state{i}"] = slab[slots]
    return arrays


def write_snapshot(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write captured arrays atomically (safe to run in a worker thread)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    count = sum(len(v) for k, v in arrays.items() if k == "ids" or k.endswith("_ids"))
    log.info("saved %d sessions to %s", count, path)


def _load(path: Path) -> tuple[dict[str, np.ndarray], Any]:
    """A snapshot file's arrays and decoded header; SnapshotError if it is unreadable."""
    try:
        # Opened here, not by np.load: numpy leaves its own file open when the zip is corrupt.
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise SnapshotError(f"{path}: not a readable seqserve snapshot ({exc})") from None
    try:
        header = json.loads(arrays["header"].tobytes())
    except (KeyError, ValueError) as exc:
        raise SnapshotError(f"{path}: snapshot header missing or unreadable ({exc})") from None
    return arrays, header


def _read(path: Path, spec: ModelSpec, window: int) -> dict[str, np.ndarray]:
    arrays, header = _load(path)
    return _check(path, arrays, header, spec, window)


def _check(
    path: Path,
    arrays: dict[str, np.ndarray],
    header: dict[str, Any],
    spec: ModelSpec,
    window: int,
) -> dict[str, np.ndarray]:
    if header.get("format") not in _READABLE:
        raise SnapshotError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header["format"] != FORMAT:
        ids = arrays.get("ids", np.empty(0))
        arrays["owners"] = np.full(ids.shape, "", dtype="U128")
    if header.get("fingerprint") != spec.fingerprint:
        raise SnapshotError(
            f"{path}: saved for model {header.get('model')!r} "
            f"v{header.get('version')}, not this {spec.name!r} v{spec.version}"
        )
    n = int(header.get("sessions", -1))
    expected = {
        "ids": (n,),
        "owners": (n,),
        "positions": (n,),
        "idle": (n,),
        "ring": (n, int(header.get("window", -1)), spec.classes),
    }
    for i, state in enumerate(spec.states):
        expected[f"state{i}"] = (n, state.size)
    for name, shape in expected.items():
        if name not in arrays or arrays[name].shape != shape:
            raise SnapshotError(f"{path}: array {name!r} missing or not of shape {shape}")
    if header["window"] != window:
        raise SnapshotError(
            f"{path}: saved with --replay-window {header['window']}, the server "
            f"runs with {window}; restart with the same window"
        )
    if (arrays["positions"] < 0).any():
        raise SnapshotError(f"{path}: negative positions")
    for name in expected:
        if arrays[name].dtype.kind == "f" and not np.isfinite(arrays[name]).all():
            raise SnapshotError(f"{path}: array {name!r} holds NaN or Inf")
    return arrays


def load_snapshot(path: str | Path, spec: ModelSpec, table: SessionTable) -> int:
    """Restore sessions into an empty table; returns how many. Raises SnapshotError, loading
    nothing, if the file cannot be trusted."""
    path = Path(path)
    arrays = _read(path, spec, table.bank.window)
    return _restore(path, arrays, table)


def _restore(path: Path, arrays: dict[str, np.ndarray], table: SessionTable) -> int:
    bank = table.bank
    clean = bool(json.loads(arrays["header"].tobytes()).get("clean", False))
    ids = [str(i) for i in arrays["ids"]]
    owners = [str(o) for o in arrays["owners"]]
    if len(set(ids)) != len(ids):
        raise SnapshotError(f"{path}: duplicate session ids")
    if len(ids) > table.max_sessions:
        raise SnapshotError(
            f"{path}: {len(ids)} sessions, more than --max-sessions {table.max_sessions}"
        )
    now = table.clock()
    order = np.argsort(-arrays["idle"], kind="stable")
    for k in order:
        session = table.create(
            ids[k],
            position=int(arrays["positions"][k]),
            last_used=now - float(arrays["idle"][k]),
            owner=owners[k],
            per_owner_limit=False,
        )
        session.restored = not clean  # after a crash, frames past it may have been lost
        for i, slab in enumerate(bank.slabs):
            slab[session.slot] = arrays[f"state{i}"][k]
        bank.ring[session.slot] = arrays["ring"][k]
    log.info("restored %d sessions from %s", len(ids), path)
    return len(ids)


@dataclass(frozen=True, slots=True)
class Part:
    """The sessions of one model version in a snapshot, not yet checked against a model."""

    model: str
    version: int
    fingerprint: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def sessions(self) -> int:
        return len(self.arrays.get("ids", ()))


def capture_parts(
    parts: Sequence[tuple[ModelSpec, SessionTable, int]],
    *,
    clean: bool = False,
    kept: Sequence[Part] = (),
) -> dict[str, np.ndarray]:
    """Every version's sessions in one snapshot (format /3): part ``i``'s arrays are named
    ``p<i>_<name>``. Call on the event loop (see ``capture``). ``kept``: parts of an earlier
    snapshot this server could not restore (a version it lacks), written again as they were
    so a server that has that version can still take them."""
    headers = []
    out: dict[str, np.ndarray] = {}
    for i, (spec, table, version) in enumerate(parts):
        arrays = capture(spec, table, clean=clean)
        header = json.loads(arrays.pop("header").tobytes())
        header["version_number"] = version
        headers.append(header)
        for name, values in arrays.items():
            out[f"p{i}_{name}"] = values
    for i, part in enumerate(kept, start=len(headers)):
        headers.append({**part.header, "version_number": part.version})
        for name, values in part.arrays.items():
            if name != "header":
                out[f"p{i}_{name}"] = values
    header = {"format": MULTI, "parts": headers, "created": time.time()}
    out["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return out


def age_part(part: Part, seconds: float, idle_timeout: float) -> Part | None:
    """``part`` as it stands ``seconds`` later on a server whose sessions expire after
    ``idle_timeout``: every session idle that much longer, those idle past the timeout gone
    (they expired here, as a session held in memory would); None once none is left."""
    ids, idle = part.arrays.get("ids"), part.arrays.get("idle")
    if ids is None or idle is None or idle.shape != ids.shape or idle.dtype.kind not in "fiu":
        return part  # not a part this server can judge; written again as it came
    idle = np.nan_to_num(idle.astype(np.float64)) + seconds  # as waiting_sessions reads it
    keep = idle <= idle_timeout
    if not keep.any():
        return None
    count = len(ids)
    header = {**part.header, "sessions": int(keep.sum())}
    arrays = {
        name: values[keep] if name != "header" and values.shape[:1] == (count,) else values
        for name, values in part.arrays.items()
    }
    arrays["idle"] = idle[keep]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return replace(part, header=header, arrays=arrays)


def waiting_sessions(part: Part) -> list[tuple[str, int, float]]:
    """(id, position, seconds idle) of every session of a part this server cannot restore;
    0 for a value the file does not give as a number (the part is not checked further)."""
    ids = part.arrays.get("ids", np.empty(0))
    count = len(ids)

    def column(name: str) -> list[float]:
        values = part.arrays.get(name)
        if values is None or values.shape != (count,) or values.dtype.kind not in "fiu":
            return [0.0] * count
        return np.nan_to_num(values.astype(np.float64)).tolist()

    positions, idle = column("positions"), column("idle")
    return [(str(ids[k]), int(positions[k]), idle[k]) for k in range(count)]


def read_parts(path: str | Path) -> list[Part]:
    """The parts of a snapshot of any format (a /1 or /2 file is one part); SnapshotError if it
    is unreadable. Each part is checked against its model by ``restore_part``."""
    path = Path(path)
    arrays, header = _load(path)
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: snapshot header is not an object")
    if header.get("format") in _READABLE:
        version = str(header.get("version", "1"))
        number = int(version) if version.isdigit() and int(version) > 0 else 1
        return [
            Part(str(header.get("model")), number, str(header.get("fingerprint")), header, arrays)
        ]
    if header.get("format") != MULTI or not isinstance(header.get("parts"), list):
        raise SnapshotError(f"{path}: format {header.get('format')!r}, expected {MULTI!r}")
    parts = []
    for i, part in enumerate(header["parts"]):
        if not isinstance(part, dict):
            raise SnapshotError(f"{path}: part {i} is not an object")
        prefix = f"p{i}_"
        own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        own["header"] = np.frombuffer(json.dumps(part).encode(), np.uint8)
        parts.append(
            Part(
                str(part.get("model")),
                int(part.get("version_number", 1)),
                str(part.get("fingerprint")),
                part,
                own,
            )
        )
    return parts


def restore_part(path: str | Path, part: Part, spec: ModelSpec, table: SessionTable) -> int:
    """Restore one part into its version's (empty) table; SnapshotError if it does not fit."""
    arrays = _check(Path(path), dict(part.arrays), part.header, spec, table.bank.window)
    return _restore(Path(path), arrays, table)
