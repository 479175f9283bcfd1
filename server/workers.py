"""Several worker processes on one port, so one machine uses all its cores.

Each worker is a full server (its own event loop, onnxruntime session and state bank) bound to
the same port with SO_REUSEPORT: the kernel spreads connections over them, and everything on one
connection (a channel's streams, a multiplexer's sessions) stays with one worker. A session that
arrives on another worker (a client reconnected) is claimed from the shared store, which is why
more than one worker needs ``--store redis://...``: the same mechanism that moves sessions
between machines moves them between processes.

The parent only supervises: it forwards SIGTERM/SIGINT (each worker drains and checkpoints its
sessions) and restarts a worker that dies, with a growing pause if it keeps dying.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import time
from types import FrameType

from .app import configure_logging, run_forever
from .settings import Settings

__all__ = ["run_workers", "worker_settings"]

log = logging.getLogger("seqserve.workers")


def worker_settings(settings: Settings, index: int) -> Settings:
    """What worker ``index`` runs with: its own replica id, metrics port and snapshot file."""
    base = settings.replica_id or socket.gethostname()
    metrics = settings.metrics_port
    if metrics > 0:
        metrics += index
    return settings.replace(
        workers=1,
        reuse_port=True,
        replica_id=f"{base}-w{index}",
        metrics_port=metrics,
        snapshot_path=f"{settings.snapshot_path}.w{index}" if settings.snapshot_path else "",
    )


def _worker(settings: Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns ^C into one SIGTERM
    configure_logging(settings)
    raise SystemExit(run_forever(settings))


def run_workers(settings: Settings) -> int:
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers: list[multiprocessing.process.BaseProcess | None] = [None] * settings.workers
    started = [0.0] * settings.workers
    failures = [0] * settings.workers
    restart_at = [0.0] * settings.workers
    log.info("starting %d workers on %s:%d", settings.workers, settings.host, settings.port)
    code = 0
    while not stopping:
        for i, process in enumerate(workers):
            if process is not None and process.is_alive():
                continue
            if process is not None:
                process.join()
                if process.exitcode == 2 and time.monotonic() - started[i] < 15:
                    # Refused to start (flags, model, certificates, port): so would the rest.
                    log.error("worker %d could not start; stopping", i)
                    code, stopping = 2, True
                    break
                failures[i] += 1
                pause = min(30.0, 0.5 * 2 ** min(failures[i], 6))
                log.error(
                    "worker %d exited with %s; restarting in %.1fs", i, process.exitcode, pause
                )
                restart_at[i] = time.monotonic() + pause
                workers[i] = None
            if time.monotonic() >= restart_at[i]:
                worker = context.Process(
                    target=_worker,
                    args=(worker_settings(settings, i),),
                    name=f"seqserve-worker-{i}",
                )
                worker.start()
                workers[i], started[i] = worker, time.monotonic()
        time.sleep(0.2)
    for process in workers:
        if process is not None and process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        if process is not None:
            process.join(settings.drain_grace + 10)
            if process.is_alive():
                process.kill()
                process.join()
    return code
