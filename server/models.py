"""The models a server serves, their versions, and which version each request goes to.

Every version has an engine of its own (its graphs, state bank, scheduler), so steps of different
models and versions never share a batch. A session is pinned when it starts to the version that
started it, and with it to that version's exact graphs: requests that name no version go to the
session's own version, and only new sessions go to the latest ready version. Session ids are one
namespace per model, across its versions.

A version leaving the policy (a newer one loaded, or an unload) turns *draining*: it keeps serving
the sessions pinned to it and takes no new ones. It is released when its last session ends, or
after ``--version-drain-timeout``: a session still on it then ends (``version_retired``), never
moved to another graph.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from .batches import BatchResult
from .engine import Engine, SessionStatus
from .errors import (
    ModelError,
    NotAllowed,
    SeqServeError,
    UnknownModel,
    VersionElsewhere,
    VersionUnavailable,
)
from .model import ModelSpec
from .repository import ModelFolder, VersionSource, parse_policy, scan, single
from .routes import Model, split_batch
from .runtime import ModelRunner
from .sessions import Quota
from .settings import Settings
from .versions import ModelVersion, VersionState, load_graphs
from .work import StepResult

__all__ = ["Models", "VersionInfo"]

log = logging.getLogger("seqserve.models")


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One line of ``ListModels``."""

    model: str
    version: int
    state: VersionState
    reason: str
    sessions: int
    fingerprint: str
    load_seconds: float
    default: bool
    latest: bool


class Models:
    """Every model the server serves: loading, versions, and the request routing API."""

    def __init__(
        self,
        settings: Settings,
        *,
        executor: Executor,
        make_engine: Callable[[ModelVersion, ModelSpec, ModelRunner], Engine],
        bundled: Path | None = None,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.make_engine = make_engine
        self.quota = Quota(settings.max_sessions, settings.max_sessions_per_principal)
        self.models: dict[str, Model] = {}
        self.default = settings.default_model
        self.admins = {p.strip() for p in settings.admin_principals.split(",") if p.strip()}
        self.policy = parse_policy(settings.version_policy)
        self._bundled = bundled
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.on_change: Callable[[ModelVersion], None] = lambda version: None  # metrics hook
        self.on_failure: Callable[[ModelVersion], None] = lambda version: None

    # -- the repository -----------------------------------------------------------------------

    def folders(self) -> dict[str, ModelFolder]:
        """What the repository holds now."""
        settings = self.settings
        if settings.model_repository:
            return scan(Path(settings.model_repository), self.policy)
        if settings.model_dir:
            from .model import load_model_spec

            spec = load_model_spec(settings.model_dir)
            return single(Path(settings.model_dir), spec.name, _number(spec.version))
        assert self._bundled is not None
        folders: dict[str, ModelFolder] = {}
        for path in sorted(self._bundled.iterdir()):
            if (path / "model.json").is_file():
                folders.update(single(path, path.name, 1))
        return folders

    def start(self) -> None:
        """Load every version the policies want, blocking (before anything is served); the
        default model must come up, the others may fail (they show as unavailable)."""
        folders = self.folders()
        if self.settings.model_dir and not self.settings.model_repository:
            self.default = next(iter(folders))
        if self.default not in folders:
            raise ModelError(
                f"--default-model {self.default!r} is not in the repository (models: "
                f"{', '.join(sorted(folders)) or 'none'})"
            )
        for name, folder in folders.items():
            model = self.models[name] = Model(name, folder.policy)
            model.problems = [str(p) for p in folder.problems]
            for problem in folder.problems:
                log.warning("repository: %s", problem)
            failed: set[int] = set()
            tried: set[int] = set()
            wanted = folder.wanted
            while wanted - tried:
                for number in sorted(wanted - tried):
                    tried.add(number)
                    if self._load_now(model, folder.versions[number]).state != "ready":
                        failed.add(number)
                # A wanted version that fails validation leaves its place in the policy to
                # the next version (latest:1 with a broken 2 serves 1).
                wanted = folder.policy.select(set(folder.versions) - failed)
            model.refresh()
        default = self.models[self.default]
        if default.latest() is None:
            problems = (
                "; ".join(
                    f"version {v.number}: {v.reason}" for v in default.versions.values() if v.reason
                )
                or "; ".join(default.problems)
                or "no version to serve"
            )
            raise ModelError(f"the default model {self.default!r} did not load: {problems}")

    def restore_target(self, name: str, number: int, fingerprint: str) -> Engine | None:
        """At start, the engine of exactly this version and graphs, loaded now if the
        repository has it (draining, when its policy does not want it); None if not here."""
        model = self.models.get(name)
        if model is None:
            return None
        version = model.versions.get(number)
        if version is not None and version.serving and version.fingerprint == fingerprint:
            return version.engine
        folder = self.folders().get(name)
        source = folder.versions.get(number) if folder is not None else None
        if source is None or (version is not None and version.serving):
            return None
        loaded = self._load_now(model, source)
        if loaded.engine is None or loaded.fingerprint != fingerprint:
            return None
        if folder is not None and number not in folder.wanted:
            self._drain(model, loaded, "loaded for the sessions pinned to it")
        model.refresh()
        return loaded.engine

    async def sync(self, folders: dict[str, ModelFolder] | None = None) -> None:
        """Bring what is served in line with the repository and the policies: load wanted
        versions that are not loaded (or changed since a failed load), drain the others."""
        async with self._lock:
            folders = self.folders() if folders is None else folders
            for name, folder in folders.items():
                model = self.models.get(name)
                if model is None:
                    model = self.models[name] = Model(name, folder.policy)
                await self._apply(model, folder)
            for name, model in self.models.items():
                if name not in folders:
                    for version in model.versions.values():
                        if version.state in ("ready", "loading"):
                            self._drain(model, version, "removed from the repository")
                    model.refresh()

    async def _apply(self, model: Model, folder: ModelFolder) -> list[int]:
        """Serve the versions the model's policy wants of ``folder`` and those loaded by name,
        and drain the others; the version numbers the policy tried to serve."""
        model.policy = folder.policy
        problems = [str(p) for p in folder.problems]
        for problem in problems:
            if problem not in model.problems:  # logged when it appears, not at every poll
                log.warning("repository: %s", problem)
        model.problems = problems
        # A wanted version that fails validation never replaces a good one: the policy is
        # applied again without it (latest:1 with a broken 2 keeps serving 1).
        failed: set[int] = set()
        wanted = folder.wanted
        while True:
            for number in sorted(wanted):
                await self._want(model, folder.versions[number])
            now = {n for n in wanted if model.versions[n].state == "unavailable"}
            if not now:
                break
            failed |= now
            wanted = folder.policy.select(set(folder.versions) - failed)
        # Versions loaded by name stay, whatever the policy says, until unloaded.
        requested = model.requested & set(folder.versions)
        for number in sorted(requested - wanted):
            await self._want(model, folder.versions[number])
        keep = wanted | requested
        for number, version in list(model.versions.items()):
            if number not in keep and version.state in ("ready", "loading"):
                self._drain(model, version, "not in the version policy")
            if number not in folder.versions and version.state == "unavailable":
                del model.versions[number]  # a failed version whose folder is gone
        model.refresh()
        return sorted(wanted | failed)

    async def _want(self, model: Model, source: VersionSource) -> None:
        version = model.versions.get(source.version)
        if version is not None:
            if version.state == "ready":
                return
            if version.state == "draining" and version.engine is not None:
                self._set(version, "ready")  # wanted again before it was released
                version.engine.accepting = True
                version.draining_since = None
                return
            if version.state == "unavailable" and version.failed_signature == source.signature:
                return  # failed, and the folder has not changed since
        await self._load(model, source)

    async def _load(self, model: Model, source: VersionSource) -> ModelVersion:
        version = self._loading(model, source)
        strict = bool(self.settings.model_repository)
        try:
            loaded = await asyncio.to_thread(load_graphs, source, self.settings, strict=strict)
        except ModelError as exc:
            return self._failed(model, version, source, exc)
        return self._install(model, version, source, *loaded)

    def _load_now(self, model: Model, source: VersionSource) -> ModelVersion:
        """The same, blocking: the first load, before anything is served."""
        version = self._loading(model, source)
        strict = bool(self.settings.model_repository)
        try:
            loaded = load_graphs(source, self.settings, strict=strict)
        except ModelError as exc:
            return self._failed(model, version, source, exc)
        return self._install(model, version, source, *loaded)

    def _loading(self, model: Model, source: VersionSource) -> ModelVersion:
        version = model.versions.get(source.version)
        if version is None or version.engine is not None:
            version = ModelVersion(model.name, source.version, source=source)
            model.versions[source.version] = version
        self._set(version, "loading")
        return version

    def _failed(
        self, model: Model, version: ModelVersion, source: VersionSource, exc: ModelError
    ) -> ModelVersion:
        version.failed_signature = source.signature
        self._set(version, "unavailable", str(exc))
        self.on_failure(version)
        log.error("model %s version %d failed to load: %s", model.name, source.version, exc)
        return version

    def _install(
        self,
        model: Model,
        version: ModelVersion,
        source: VersionSource,
        spec: ModelSpec,
        runtime: ModelRunner,
        seconds: float,
    ) -> ModelVersion:
        version.engine = self.make_engine(version, spec, runtime)
        version.engine.start()
        version.load_seconds = seconds
        version.failed_signature = None
        version.source = source
        self._set(version, "ready")
        model.refresh()
        log.info(
            "model %s version %d ready (%.2f s; graphs %s)",
            model.name,
            source.version,
            seconds,
            version.fingerprint[:12],
        )
        return version

    def _set(self, version: ModelVersion, state: VersionState, reason: str = "") -> None:
        version.set_state(state, reason)
        model = self.models.get(version.model)
        if model is not None:
            model.refresh()
        self.on_change(version)

    def _drain(self, model: Model, version: ModelVersion, reason: str) -> None:
        if version.engine is None:
            self._set(version, "unavailable", reason)
            return
        version.engine.accepting = False
        version.draining_since = time.monotonic()
        self._set(version, "draining", reason)
        log.info(
            "model %s version %d draining (%s): %d sessions pinned to it",
            model.name,
            version.number,
            reason,
            version.sessions,
        )

    async def tend(self) -> None:
        """Release draining versions whose sessions are gone or whose time is up."""
        timeout = self.settings.version_drain_timeout
        for model in list(self.models.values()):
            for version in list(model.versions.values()):
                if version.state != "draining" or version.engine is None:
                    continue
                expired = (
                    timeout > 0
                    and version.draining_since is not None
                    and time.monotonic() - version.draining_since >= timeout
                )
                # Not while sessions are being claimed into it from the shared store (a
                # version loaded for a session that lives on it has none until that is done).
                idle = version.sessions == 0 and not version.engine.handover.busy
                if idle or expired:
                    await self._release(model, version)

    async def _release(self, model: Model, version: ModelVersion) -> None:
        engine = version.engine
        if engine is None:
            return
        if version.sessions:
            log.warning(
                "model %s version %d: drain timeout, %d sessions end with it (version_retired)",
                model.name,
                version.number,
                version.sessions,
            )
        model.retire(version)
        version.engine = None
        self._set(version, "unavailable", f"released ({version.reason or 'retired'})")
        model.refresh()
        heir = model.latest()
        if heir is not None and heir.engine is not None:
            # Sessions that ended on it (closed, expired) are still told so, not "unknown".
            for session_id, tomb in engine.table.tombstones():
                heir.engine.table.bury(session_id, tomb.reason, tomb.position, tomb.owner)
        engine.draining = True
        await engine.drain()
        await engine.stop()

    async def run(self) -> None:
        """Housekeeping while serving: release drained versions, poll the repository."""
        poll = self.settings.repository_poll
        next_poll = time.monotonic() + poll if poll > 0 else float("inf")
        while True:
            await asyncio.sleep(0.25)
            try:
                await self.tend()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + poll
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model housekeeping failed")

    # -- load / unload ------------------------------------------------------------------------

    def allowed(self, principal: str) -> None:
        if principal and principal not in self.admins:
            raise NotAllowed(
                f"principal {principal!r} may not load or unload models (--admin-principals)"
            )

    async def load(self, name: str, version: int = 0, principal: str = "") -> list[ModelVersion]:
        """Load a model (the versions its policy wants, or the one named) from the repository."""
        self.allowed(principal)
        folders = self.folders()
        folder = folders.get(name)
        if folder is None:
            raise UnknownModel(f"model {name!r} is not in the repository")
        if version and version not in folder.versions:
            raise UnknownModel(
                f"model {name!r} has no version {version} in the repository",
                reason="unknown_version",
            )
        async with self._lock:
            model = self.models.get(name)
            if model is None:
                model = self.models[name] = Model(name, folder.policy)
            if version:  # loaded by name: it stays whatever the policy says, until unloaded
                model.requested.add(version)
            numbers = [version] if version else sorted(folder.wanted)
            for number in numbers:
                current = model.versions.get(number)
                if current is not None and current.state == "unavailable":
                    current.failed_signature = None  # asked explicitly: try again
            tried = await self._apply(model, folder)  # the named version is requested
            loaded = [model.versions[number] for number in ([version] if version else tried)]
        failed = [v for v in loaded if v.state != "ready"]
        if failed:
            raise ModelError("; ".join(f"{name} v{v.number}: {v.reason}" for v in failed))
        return loaded

    async def unload(self, name: str, version: int = 0, principal: str = "") -> list[ModelVersion]:
        """Drain a model's versions (or the one named): pinned sessions finish on them."""
        self.allowed(principal)
        model = self.model(name)
        async with self._lock:
            targets = [model.version(version)] if version else list(model.versions.values())
            if version:
                model.requested.discard(version)
            else:
                model.requested.clear()
            for target in targets:
                if target.state in ("ready", "loading"):
                    self._drain(model, target, "unloaded")
            model.refresh()
        return targets

    async def ensure(self, name: str, number: int, fingerprint: str) -> Engine:
        """The engine of exactly this version and graphs, loading it from the repository if it
        is there (to take over a session that ran on it); VersionUnavailable otherwise."""
        model = self.model(name)
        version = model.versions.get(number)
        if version is not None and version.serving and version.fingerprint.startswith(fingerprint):
            assert version.engine is not None
            return version.engine
        folder = self.folders().get(name)
        source = folder.versions.get(number) if folder is not None else None
        if source is not None and (version is None or not version.serving):
            async with self._lock:
                # Requests for many sessions of that version arrive together: the first loads
                # it, the others find it loaded (loading it again would replace the engine
                # holding the sessions adopted meanwhile).
                loaded = model.versions.get(number)
                if loaded is None or not loaded.serving:
                    loaded = await self._load(model, source)
                    wanted = folder.wanted | model.requested  # type: ignore[union-attr]
                    if loaded.state == "ready" and number not in wanted:
                        self._drain(model, loaded, "loaded for sessions pinned to it")
                    model.refresh()
            if loaded.serving and loaded.fingerprint.startswith(fingerprint) and loaded.engine:
                return loaded.engine
        raise VersionUnavailable(
            f"model {name!r} version {number} with graphs {fingerprint[:12]} is not available "
            "on this server"
        )

    # -- lookups ------------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        found = self.models.get(name or self.default)
        if found is None:
            raise UnknownModel(
                f"unknown model {name!r} (models here: {', '.join(sorted(self.models))})"
            )
        return found

    def engines(self) -> Iterator[Engine]:
        for model in self.models.values():
            yield from model.engines

    def versions(self) -> Iterator[ModelVersion]:
        for model in self.models.values():
            yield from model.versions.values()

    def list(self) -> list[VersionInfo]:
        out = []
        for name in sorted(self.models):
            model = self.models[name]
            latest = model.latest()
            for number in sorted(model.versions):
                v = model.versions[number]
                out.append(
                    VersionInfo(
                        name,
                        number,
                        v.state,
                        v.reason,
                        v.sessions,
                        v.fingerprint,
                        v.load_seconds,
                        name == self.default,
                        latest is v,
                    )
                )
        return out

    @property
    def live_sessions(self) -> int:
        return self.quota.live

    # -- the data plane, by model -------------------------------------------------------------

    def submit(
        self,
        model: str,
        version: int,
        session_id: str,
        position: int | None,
        frames: np.ndarray,
        *,
        start: bool = False,
        end: bool = False,
        principal: str = "",
    ) -> asyncio.Future[StepResult]:
        target = self.model(model)
        creating = start and position in (0, None)
        try:
            engine = target.route(session_id, version, creating=creating)
        except (UnknownModel, VersionUnavailable) as exc:
            if creating or not self._shared(target, exc, version):
                raise
            return asyncio.ensure_future(
                self._after_loading(
                    target.name,
                    version,
                    lambda: self.submit(
                        model,
                        version,
                        session_id,
                        position,
                        frames,
                        start=start,
                        end=end,
                        principal=principal,
                    ),
                )
            )
        future = engine.submit(
            session_id, position, frames, start=start, end=end, principal=principal
        )
        if engine.store is None:  # sessions never live on another version's shelf
            return future
        return self._rerouted(
            model,
            future,
            lambda other: other.submit(
                session_id, position, frames, start=start, end=end, principal=principal
            ),
        )

    def _shared(self, model: Model, exc: SeqServeError, version: int) -> bool:
        """A request names a version not loaded here, for a session that may live on it in the
        shared store (another replica ran it): worth loading that version from the repository."""
        if not version or not any(engine.store is not None for engine in model.engines):
            return False
        if isinstance(exc, UnknownModel) and exc.reason != "unknown_version":
            return False
        folder = self.folders().get(model.name)
        return folder is not None and version in folder.versions

    async def _after_loading(
        self, name: str, version: int, again: Callable[[], asyncio.Future[StepResult]]
    ) -> StepResult:
        await self.ensure_version(name, version)
        return await again()

    async def ensure_version(self, name: str, number: int) -> Engine:
        """Version ``number`` of a model, loaded from the repository if it is not served (then
        draining, unless the policy wants it): a session may be pinned to it elsewhere."""
        model = self.model(name)
        current = model.versions.get(number)
        if current is not None and current.serving and current.engine is not None:
            return current.engine
        folder = self.folders().get(model.name)
        source = folder.versions.get(number) if folder is not None else None
        if folder is None or source is None:
            raise UnknownModel(
                f"model {name!r} has no version {number} in the repository",
                reason="unknown_version",
            )
        async with self._lock:
            current = model.versions.get(number)
            if current is None or not current.serving:
                current = await self._load(model, source)
                wanted = folder.wanted | model.requested
                if current.state == "ready" and number not in wanted:
                    self._drain(model, current, "loaded for the sessions pinned to it")
                model.refresh()
        if current.engine is None or not current.serving:
            raise VersionUnavailable(
                f"model {name!r} version {number} could not be loaded: {current.reason}"
            )
        return current.engine

    def submit_batch(
        self,
        model: str,
        version: int,
        session_ids: Sequence[str],
        positions: Sequence[int],
        frames: np.ndarray,
        *,
        start: bool = False,
        principal: str = "",
    ) -> asyncio.Future[BatchResult]:
        """One frame for each of many sessions; entries on different versions run on their
        own versions (one group each) and come back as one result."""
        target = self.model(model)
        engines = target.engines
        if len(engines) == 1 and not version:
            future = engines[0].submit_batch(
                session_ids, positions, frames, start=start, principal=principal
            )
        else:
            future = split_batch(target, version, session_ids, positions, frames, start, principal)
        if not any(engine.store is not None for engine in engines):
            return future
        return self._rerouted_batch(model, future, session_ids, positions, frames, start, principal)

    def open(self, model: str, version: int, session_id: str, principal: str) -> SessionStatus:
        target = self.model(model)
        engine = target.route(session_id, version, creating=True)
        return engine.open(session_id or None, principal)

    async def lookup(self, model: str, session_id: str, principal: str) -> SessionStatus:
        return await self._session_call(model, session_id, principal, Engine.lookup)

    async def reset(self, model: str, session_id: str, principal: str) -> SessionStatus:
        return await self._session_call(model, session_id, principal, Engine.reset)

    async def close(self, model: str, session_id: str, principal: str) -> SessionStatus:
        return await self._session_call(model, session_id, principal, Engine.close)

    async def _session_call(
        self,
        model: str,
        session_id: str,
        principal: str,
        call: Callable[[Engine, str, str], Awaitable[SessionStatus]],
    ) -> SessionStatus:
        """A session call on the engine of the session's version (found in the shared store
        when it lives on a version not loaded here: loaded, then asked)."""
        engine = self.model(model).route(session_id, 0, creating=False)
        try:
            return await call(engine, session_id, principal)
        except VersionElsewhere as exc:
            return await call(await self._elsewhere(model, exc), session_id, principal)

    # -- sessions that live on another version (shared store) ---------------------------------

    async def _elsewhere(self, model: str, exc: VersionElsewhere) -> Engine:
        """The engine of the version a session lives on, loaded if the repository has it."""
        return await self.ensure(self.model(model).name, exc.version, exc.fingerprint)

    def _rerouted(
        self,
        model: str,
        first: asyncio.Future[StepResult],
        again: Callable[[Engine], asyncio.Future[StepResult]],
    ) -> asyncio.Future[StepResult]:
        """``first``'s outcome, unless it says the session lives on another version: then that
        version's engine (loaded if need be) gets the request instead, once."""
        out: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

        async def retry(exc: VersionElsewhere) -> StepResult:
            return await again(await self._elsewhere(model, exc))

        def settle(done: asyncio.Future[StepResult]) -> None:
            if out.done():
                return
            if done.cancelled():
                out.cancel()
                return
            exc = done.exception()
            if exc is None:
                out.set_result(done.result())
            else:
                out.set_exception(_unwrapped(exc))

        def first_done(done: asyncio.Future[StepResult]) -> None:
            exc = done.exception() if not done.cancelled() else None
            if isinstance(exc, VersionElsewhere):
                asyncio.ensure_future(retry(exc)).add_done_callback(settle)
            else:
                settle(done)

        first.add_done_callback(first_done)
        return out

    def _rerouted_batch(
        self,
        model: str,
        first: asyncio.Future[BatchResult],
        session_ids: Sequence[str],
        positions: Sequence[int],
        frames: np.ndarray,
        start: bool,
        principal: str,
    ) -> asyncio.Future[BatchResult]:
        """A batch's entries whose sessions live on another version go there, once."""
        ids, wanted = list(session_ids), list(positions)

        async def finish() -> BatchResult:
            result = await first
            moved = {
                i: exc for i, exc in result.errors.items() if isinstance(exc, VersionElsewhere)
            }
            by_where: dict[str, list[int]] = {}
            for i, exc in moved.items():
                by_where.setdefault(exc.where, []).append(i)
            for rows in by_where.values():
                try:
                    engine = await self._elsewhere(model, moved[rows[0]])
                except SeqServeError as exc:
                    for i in rows:
                        result.errors[i] = exc
                    continue
                index = np.array(rows, np.intp)
                sub = await engine.submit_batch(
                    [ids[i] for i in rows],
                    [wanted[i] for i in rows],
                    frames[index],
                    start=start,
                    principal=principal,
                )
                for j, i in enumerate(rows):
                    if j in sub.errors:
                        result.errors[i] = _unwrapped(sub.errors[j])
                    else:
                        del result.errors[i]
                result.probabilities[index] = sub.probabilities
                result.next_positions[index] = sub.next_positions
                result.replayed[index] = sub.replayed
                result.versions[index] = sub.versions
            return result

        return asyncio.ensure_future(finish())


@overload
def _unwrapped(exc: Exception) -> Exception: ...
@overload
def _unwrapped(exc: BaseException) -> BaseException: ...
def _unwrapped(exc: BaseException) -> BaseException:
    """What a client is told of a session found on a version this server could not serve."""
    if isinstance(exc, VersionElsewhere):
        return VersionUnavailable(
            f"{exc}; this server cannot load that version (model version {exc.version}, "
            f"graphs {exc.fingerprint})"
        )
    return exc


def _number(version: str) -> int:
    return int(version) if version.isdigit() and int(version) > 0 else 1
