"""One model's versions and where each request for one of its sessions goes: to the version the
session is pinned to (its exact graphs), or for a new session to the version asked for or the
latest ready one; and a StepBatch whose entries are pinned to different versions, split into one
group per version and merged back in entry order. ``models.Models`` loads the versions."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .batches import BatchResult
from .engine import Engine
from .errors import (
    BadRequest,
    SeqServeError,
    SessionNotFound,
    UnknownModel,
    VersionDraining,
    VersionMismatch,
    VersionRetired,
    VersionUnavailable,
)
from .repository import VersionPolicy
from .versions import ModelVersion

__all__ = ["Model", "Waiting", "split_batch"]

_RETIRED = 100_000  # ids of sessions that ended with their version, remembered for late requests


@dataclass(frozen=True, slots=True)
class Waiting:
    """A session saved (snapshot) on a version this server cannot load: it answers
    version_unavailable until ``expires`` (``time.monotonic()``), then expired."""

    version: int
    position: int
    expires: float


class Model:
    """One model's versions and the sessions pinned to them."""

    def __init__(self, name: str, policy: VersionPolicy) -> None:
        self.name = name
        self.policy = policy
        self.versions: dict[int, ModelVersion] = {}
        self.problems: list[str] = []  # what the repository holds for it that cannot serve
        # Sessions that ended with their version: (version, position), for a precise answer.
        self.retired: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Sessions saved (snapshot) on a version this server cannot load.
        self.unavailable: dict[str, Waiting] = {}
        # Versions loaded by name (LoadModel with a version): served whatever the policy says,
        # until unloaded.
        self.requested: set[int] = set()
        self._engines: list[Engine] = []  # serving engines, newest version first
        self._latest: ModelVersion | None = None
        # Features per frame of the latest version (a codec's hint; each version checks its own).
        self.features = 0

    # -- which versions serve -----------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute the serving engines and the latest ready version after a version changed
        state (every request reads them)."""
        serving = [v for v in self.versions.values() if v.serving]
        serving.sort(key=lambda v: v.number, reverse=True)
        self._engines = [v.engine for v in serving if v.engine is not None]
        ready = [v for v in self.versions.values() if v.state == "ready" and v.engine is not None]
        self._latest = max(ready, key=lambda v: v.number) if ready else None
        shown = self._latest.engine if self._latest is not None else None
        if shown is None and self._engines:
            shown = self._engines[0]
        self.features = shown.spec.features if shown is not None else 0

    @property
    def engines(self) -> list[Engine]:
        return self._engines

    def latest(self) -> ModelVersion | None:
        """The highest ready version: where new sessions go."""
        return self._latest

    def version(self, number: int) -> ModelVersion:
        found = self.versions.get(number)
        if found is None:
            known = ", ".join(str(v) for v in sorted(self.versions)) or "none"
            raise UnknownModel(
                f"model {self.name!r} has no version {number} (versions here: {known})",
                reason="unknown_version",
            )
        return found

    # -- where a request goes -----------------------------------------------------------------

    def holder(self, session_id: str) -> Engine | None:
        """The engine holding the live session."""
        for engine in self._engines:
            if engine.table.find(session_id) is not None:
                return engine
        return None

    def route(self, session_id: str, version: int, *, creating: bool) -> Engine:
        """The engine a request for ``session_id`` goes to. ``creating``: it may start a new
        session (a start at position 0, an open)."""
        engine = self.holder(session_id)
        if engine is not None:
            if version and engine.version != version:
                raise VersionMismatch(
                    f"session {session_id!r} runs on model {self.name!r} version "
                    f"{engine.version}, not {version}: a session keeps the version it started on"
                )
            return engine
        if not creating:
            self._gone(session_id)
            for engine in self._engines:  # ended here: that engine says how (closed, expired)
                if engine.table.knows(session_id):
                    return engine
        if version:
            chosen = self.version(version)
            if chosen.state == "draining" and creating:
                raise VersionDraining(
                    f"model {self.name!r} version {version} is draining: it takes no new "
                    "sessions; start them on the latest version (name no version)"
                )
            if not chosen.serving or chosen.engine is None:
                raise VersionUnavailable(
                    f"model {self.name!r} version {version} is {chosen.state}"
                    + (f": {chosen.reason}" if chosen.reason else "")
                )
            return chosen.engine
        return self._latest_engine()

    def _gone(self, session_id: str) -> None:
        """A session that ended with its version, or waits for one this server lacks."""
        retired = self.retired.get(session_id)
        if retired is not None:
            version, position = retired
            raise VersionRetired(
                f"session {session_id!r} ended at position {position} with model "
                f"{self.name!r} version {version}, which was retired; start a new session",
                position=position,
            )
        waiting = self.unavailable.get(session_id)
        if waiting is None:
            return
        if time.monotonic() >= waiting.expires:
            raise SessionNotFound(
                f"session {session_id!r} expired at position {waiting.position}: it waited "
                f"longer than the idle timeout for model {self.name!r} version "
                f"{waiting.version}, which this server cannot load",
                reason="expired",
                position=waiting.position,
            )
        raise VersionUnavailable(
            f"session {session_id!r} runs on model {self.name!r} version {waiting.version}, "
            "which this server cannot load; resume it on a server that has that version"
        )

    def stateless(self, version: int) -> Engine:
        """The engine for a request that touches no session (Predict, GetModel): the version
        named (draining ones too: they still serve), else the latest ready one."""
        if not version:
            return self._latest_engine()
        chosen = self.version(version)
        if not chosen.serving or chosen.engine is None:
            raise VersionUnavailable(
                f"model {self.name!r} version {version} is {chosen.state}"
                + (f": {chosen.reason}" if chosen.reason else "")
            )
        return chosen.engine

    def _latest_engine(self) -> Engine:
        latest = self.latest()
        if latest is None or latest.engine is None:
            raise VersionUnavailable(f"model {self.name!r} has no ready version{self._why()}")
        return latest.engine

    def _why(self) -> str:
        states = [
            f"version {v.number} {v.state}" + (f", {v.reason}" if v.reason else "")
            for v in sorted(self.versions.values(), key=lambda v: v.number)
        ]
        return f" ({'; '.join(states)})" if states else ""

    def retire(self, version: ModelVersion) -> None:
        """Remember the sessions still on a version that is being released."""
        if version.engine is None:
            return
        for session in version.engine.table:
            self.retired[session.id] = (version.number, session.position)
            self.retired.move_to_end(session.id)
        while len(self.retired) > _RETIRED:
            self.retired.popitem(last=False)


def split_batch(
    model: Model,
    version: int,
    session_ids: Sequence[str],
    positions: Sequence[int],
    frames: np.ndarray,
    start: bool,
    principal: str,
) -> asyncio.Future[BatchResult]:
    """A batch whose entries may be pinned to different versions: one sub-batch per version,
    merged back in entry order."""
    ids = list(session_ids)
    wanted = list(positions)
    if len(wanted) != len(ids):
        raise BadRequest(
            f"{len(ids)} session ids but {len(wanted)} positions", reason="bad_request"
        )
    by_engine: dict[Engine, list[int]] = {}
    failed: dict[int, SeqServeError] = {}
    for i, session_id in enumerate(ids):
        try:
            engine = model.route(session_id, version, creating=start and wanted[i] == 0)
        except SeqServeError as exc:
            failed[i] = exc
            continue
        by_engine.setdefault(engine, []).append(i)
    loop = asyncio.get_running_loop()
    out: asyncio.Future[BatchResult] = loop.create_future()
    classes = next(iter(model.engines)).spec.classes if model.engines else 1
    result = BatchResult(
        np.zeros((len(ids), classes), np.float32),
        np.zeros(len(ids), np.uint64),
        np.zeros(len(ids), np.bool_),
        np.zeros(len(ids), np.uint64),
        dict(failed),
    )
    parts = []
    for engine, rows in by_engine.items():
        index = np.array(rows, np.intp)
        parts.append(
            (
                index,
                engine.submit_batch(
                    [ids[i] for i in rows],
                    [wanted[i] for i in rows],
                    frames[index],
                    start=start,
                    principal=principal,
                ),
            )
        )

    def merge(_: object = None) -> None:
        if out.done() or not all(part.done() for _, part in parts):
            return
        for index, part in parts:
            exc = part.exception()
            if exc is not None:
                for i in index.tolist():
                    result.errors[i] = exc  # type: ignore[assignment]
                continue
            sub = part.result()
            result.probabilities[index] = sub.probabilities
            result.next_positions[index] = sub.next_positions
            result.replayed[index] = sub.replayed
            result.versions[index] = sub.versions
            for j, exc in sub.errors.items():
                result.errors[int(index[j])] = exc
        for i, exc in result.errors.items():
            position = getattr(exc, "expected", None)
            if position is None:
                position = getattr(exc, "position", 0)
            result.next_positions[i] = position
        out.set_result(result)

    if not parts:
        merge()
    for _, part in parts:
        part.add_done_callback(merge)
    return out
