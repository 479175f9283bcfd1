"""Entry points: ``create_server`` builds and binds, ``serve`` runs until a signal, ``run_forever``
runs one server in this process with signal handlers (``cli.main`` is the ``seqserve-server``
command)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from seqserve.proto import seqserve_pb2 as pb

from .auth import AuthInterceptor, ConfigError, load_tokens, server_credentials
from .engine import Engine
from .errors import ModelError, SnapshotError
from .metrics import Metrics, VersionGauges
from .model import ModelSpec, bundled_models_dir
from .models import Models
from .oip import HttpFront, InferenceService, OipFront, bind_socket
from .routes import Waiting
from .runtime import ModelRunner, inference_executor
from .servicer import SeqServeServicer
from .settings import Settings
from .snapshot import (
    Part,
    age_part,
    capture_parts,
    lock_snapshot,
    read_parts,
    restore_part,
    waiting_sessions,
    write_snapshot,
)
from .versions import ModelVersion
from .wire import add_to_server

__all__ = ["App", "configure_logging", "create_server", "run_forever", "serve"]

log = logging.getLogger("seqserve.server")

SERVICE = pb.DESCRIPTOR.services_by_name["SeqServe"].full_name


class App:
    """A built, bound server: gRPC, the models and their engines, metrics endpoint. ``start``
    then ``stop``."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        models: Models,
        servicer: SeqServeServicer,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        inference: InferenceService | None = None,
        rest: HttpFront | None = None,
        snapshot_lock: IO[str] | None = None,
    ) -> None:
        self.settings = settings
        self.grpc = grpc_server
        self.models = models
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self.inference = inference  # inference.GRPCInferenceService, on the gRPC port
        self.rest = rest  # the same protocol's REST API (--http-port)
        self.http_port: int | None = rest.port if rest is not None else None
        self.metrics_port: int | None = None
        self._http: Any = None
        # One writer thread: snapshot writes land in the order they were taken, so the final
        # drain snapshot is never overwritten by an older periodic one finishing late.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="seqserve-snapshot")
        self._checkpoints: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._snapshot_lock = snapshot_lock  # held until stopped: one server per snapshot file
        # Snapshot parts of versions this server cannot load: every snapshot it writes keeps
        # them, so the sessions are not lost to a server started without their version.
        self.kept: list[Part] = []
        self._kept_at = time.monotonic()  # when the kept parts' idle times were last advanced

    @property
    def engine(self) -> Engine:
        """The engine of the default model's latest version (what a request naming no model
        and no version gets)."""
        return self.models.model("").stateless(0)

    async def start(self) -> None:
        if self.settings.metrics_port >= 0:
            self._http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
            self.metrics_port = self._http.server_port
        stores = {engine.store for engine in self.models.engines() if engine.store is not None}
        for store in stores:
            if not await store.ping():
                log.warning(
                    "session store %s is not reachable; serving from memory until it is",
                    store.url,
                )
                break
        if self.settings.snapshot_path and self.settings.snapshot_interval > 0:
            self._checkpoints = asyncio.create_task(self._checkpoint_loop())
        self._housekeeping = asyncio.create_task(self.models.run(), name="seqserve-models")
        await self.grpc.start()
        if self.rest is not None:
            await self.rest.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work, answer what was accepted (within the grace
        period), end streams with UNAVAILABLE, snapshot every session, stop."""
        grace = self.settings.drain_grace
        await self.health.enter_graceful_shutdown()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self.refuse_new()
        engines = list(self.models.engines())
        try:
            await asyncio.wait_for(asyncio.gather(*(e.drain() for e in engines)), grace)
        except TimeoutError:
            log.warning("drain grace (%.1fs) ran out with requests still queued", grace)
        for engine in engines:  # nothing runs past here, so the snapshot is consistent
            await engine.scheduler.stop()
        saved = 0
        for engine in engines:
            saved += await engine.save_to_store()
        if saved:
            log.info("drain: %d sessions saved to the session store", saved)
        if self._checkpoints is not None:
            self._checkpoints.cancel()
        if self.settings.snapshot_path:
            await asyncio.wrap_future(
                self._writer.submit(
                    write_snapshot, self.settings.snapshot_path, self._capture(clean=True)
                )
            )
        self._writer.shutdown(wait=True)
        if self.rest is not None:
            await self.rest.stop()
        await self.grpc.stop(min(grace, 5.0))
        for engine in engines:
            await engine.stop()
        self.models.executor.shutdown(wait=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._snapshot_lock is not None:
            self._snapshot_lock.close()

    def refuse_new(self) -> None:
        """The drain's first step: new work is refused (``draining``) and open streams end once
        what they had accepted is answered."""
        self.models.draining = True
        for engine in self.models.engines():
            engine.draining = True
        self.servicer.drain()
        if self.inference is not None:
            self.inference.drain()

    def _capture(self, *, clean: bool = False) -> dict[str, np.ndarray]:
        self._age_kept()
        return capture_parts(
            [(e.spec, e.table, e.version) for e in self.models.engines() if len(e.table)],
            clean=clean,
            kept=self.kept,
        )

    def _age_kept(self) -> None:
        """Kept parts lose the sessions that stayed idle past the idle timeout while this
        server ran, as sessions in memory expire (here they answer expired from then on)."""
        now = time.monotonic()
        timeout = self.settings.session_idle_timeout
        aged = [age_part(part, now - self._kept_at, timeout) for part in self.kept]
        self._kept_at = now
        self.kept = [part for part in aged if part is not None]

    async def checkpoint(self) -> None:
        """Save every session now (captured on the loop, written in the writer thread)."""
        arrays = self._capture()
        await asyncio.wrap_future(
            self._writer.submit(write_snapshot, self.settings.snapshot_path, arrays)
        )

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            try:
                await self.checkpoint()
            except OSError as exc:
                log.error("periodic snapshot failed: %s", exc)


def create_server(
    settings: Settings, *, registry: CollectorRegistry | None = None
) -> tuple[App, int]:
    """Build everything, load the models and bind the gRPC port (0 picks one); call from a
    running event loop.

    Raises ModelError / SnapshotError / auth.ConfigError with a message fit for the user."""
    credentials = server_credentials(settings)  # bad TLS or token files fail before the model
    tokens = load_tokens(settings)
    lock = lock_snapshot(settings.snapshot_path) if settings.snapshot_path else None
    try:
        return _create(settings, registry, credentials, tokens, lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _create(
    settings: Settings,
    registry: CollectorRegistry | None,
    credentials: grpc.ServerCredentials | None,
    tokens: dict[bytes, str],
    lock: IO[str] | None,
) -> tuple[App, int]:
    interceptors = []
    if tokens or settings.tls_client_ca:
        interceptors.append(AuthInterceptor(tokens, certificates=bool(settings.tls_client_ca)))
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    executor = inference_executor()
    models: Models

    def make_engine(version: ModelVersion, spec: ModelSpec, runtime: ModelRunner) -> Engine:
        return Engine(
            spec,
            runtime,
            settings,
            observer=metrics.observer(spec.name, version.number),
            executor=executor,
            quota=models.quota,
            version=version.number,
        )

    models = Models(
        settings, executor=executor, make_engine=make_engine, bundled=bundled_models_dir()
    )
    models.on_failure = lambda v: metrics.load_failures.labels(v.model, str(v.number)).inc()
    try:
        models.start()
        kept = _restore(settings, models)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    metrics.track_versions(
        lambda: [
            VersionGauges(
                v.model,
                v.number,
                v.state,
                v.sessions,
                v.sessions * (v.engine.bank.bytes_per_slot if v.engine else 0),
                v.load_seconds,
            )
            for v in models.versions()
        ]
    )

    limit = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # Two servers on one port split connections between them: only workers sharing a
            # session store (--workers) may do that; anything else fails to bind instead.
            ("grpc.so_reuseport", int(settings.reuse_port)),
        ],
    )
    servicer = SeqServeServicer(models, metrics)
    add_to_server(servicer, server)  # requests that do not decode reach it as Undecodable
    front = OipFront(models, metrics, settings)
    inference = InferenceService(front)
    server.add_generic_rpc_handlers((inference,))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    rest = None
    if settings.http_port >= 0:
        sock = bind_socket(settings.host, settings.http_port, settings.reuse_port)
        rest = HttpFront(front, settings, sock, tokens)
    app = App(settings, server, models, servicer, health_servicer, metrics, inference, rest, lock)
    app.kept = kept
    return app, port


def _restore(settings: Settings, models: Models) -> list[Part]:
    """Sessions of the last snapshot, each into exactly the version and graphs it ran on
    (loaded from the repository if it is there but not wanted: it then drains). Sessions of a
    version of a served model this server lacks answer version_unavailable, and their part is
    returned, to be written into every later snapshot; a snapshot of a model not served at all
    is refused whole (a server started on the wrong folder)."""
    path = Path(settings.snapshot_path) if settings.snapshot_path else None
    kept: list[Part] = []
    if path is None or not path.exists():
        return kept
    try:
        parts = read_parts(path)
        for part in parts:
            if part.model not in models.models:
                raise SnapshotError(
                    f"{path}: saved for model {part.model!r} v{part.version}, which this "
                    f"server does not serve ({', '.join(sorted(models.models))})"
                )
        targets = [
            (part, models.restore_target(part.model, part.version, part.fingerprint))
            for part in parts
        ]
        for part, engine in targets:
            if engine is not None and len(engine.table):
                raise SnapshotError(f"{path}: two parts for {part.model} v{part.version}")
        for part, engine in targets:
            if engine is None:
                model = models.models[part.model]
                now = time.monotonic()
                for session_id, position, waited in waiting_sessions(part):
                    model.unavailable[session_id] = Waiting(
                        part.version, position, now + settings.session_idle_timeout - waited
                    )
                log.warning(
                    "%s: %d sessions ran on %s version %d (graphs %s), which this server "
                    "cannot load; they answer version_unavailable",
                    path,
                    part.sessions,
                    part.model,
                    part.version,
                    part.fingerprint[:12],
                )
                kept.append(part)
                continue
            restore_part(path, part, engine.spec, engine.table)
    except SnapshotError as exc:
        if not settings.ignore_bad_snapshot:
            raise
        for engine in models.engines():
            for session in engine.table:
                engine.table.end(session, "expired")
        log.error("%s; starting with no sessions (--ignore-bad-snapshot)", exc)
        return []
    if settings.snapshot_interval <= 0:
        # Restored state now lives in memory and nothing rewrites the file until the next drain:
        # a stale copy must never load twice. With periodic snapshots the file is rewritten
        # within the interval, and after a crash it is exactly the last durable state.
        path.unlink()
    return kept


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    app, port = create_server(settings)
    await app.start()
    log.info(
        "serving %s (default %s) on %s:%d (%s, %s; REST on :%s, metrics on :%s, %d sessions "
        "restored; %s event loop)",
        ", ".join(f"{v.model} v{v.version} {v.state}" for v in app.models.list()),
        app.models.default,
        settings.host,
        port,
        "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext",
        "authentication on"
        if settings.tokens_file or settings.auth_token or settings.tls_client_ca
        else "authentication off",
        app.http_port,
        app.metrics_port,
        app.models.live_sessions,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = stop or asyncio.Event()
    await stop.wait()
    log.info("draining")
    await app.stop()
    log.info("stopped")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def run_forever(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the exit status (2: could not start)."""

    # The inference thread releases the GIL while onnxruntime runs and needs it back to hand
    # over results; with the loop busy it would wait up to the 5 ms default switch interval.
    sys.setswitchinterval(0.0005)

    async def run() -> None:
        stop = asyncio.Event()
        # Everything built so far lives as long as the process: keep it out of GC passes, which
        # otherwise rescan it and show up as latency spikes.
        gc.freeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        factory = loop_factory(settings.loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run())
    except (ModelError, SnapshotError, ConfigError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--loop`` names: uvloop's where asked for (or, with ``auto``, where it is
    installed), else None (asyncio's own). ConfigError if uvloop is asked for and missing."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            missing = "--loop uvloop: uvloop is not installed (pip install uvloop)"
            raise ConfigError(missing) from None
        return None
    return uvloop.new_event_loop
