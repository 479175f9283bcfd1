"""``seqserve stream``: replay recordings as live sessions multiplexed on one stream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any, TextIO

from .aio import AsyncClient
from .errors import DeadlineExceeded, SeqServeError
from .inputs import Recording, check_features, load_recordings, truth_label
from .live import JsonLines, LiveView, PlainLines, Progress, View, print_summary, summary

__all__ = ["stream_command"]


async def stream_command(client: AsyncClient, args: argparse.Namespace) -> int:
    model = await client.model(args.model, version=args.version)
    recordings = [r for source in args.sources for r in load_recordings(source, model.name)]
    check_features(recordings, model)
    rows = [
        Progress(
            r.name, len(r.frames), truth_label(r.truth, model) if r.truth is not None else None
        )
        for r in recordings
    ]
    view = _view(sys.stdout, rows, args.json)
    # an answer may wait for a resume: allow the whole resume budget on top of the timeout
    step_timeout = args.timeout + args.resume_for if args.timeout else None
    started = time.perf_counter()
    try:
        outcomes = await asyncio.gather(
            *(
                _replay(client, rec, row, view, args, max(1, args.depth), step_timeout, model.name)
                for rec, row in zip(recordings, rows, strict=True)
            ),
            return_exceptions=True,
        )
    finally:
        view.close()
    seconds = time.perf_counter() - started
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    for error in errors:
        if not isinstance(error, Exception):
            raise error
    report = summary(rows, seconds, client.multiplexer.reconnects)
    if args.json:
        print(json.dumps({"summary": report}))
    else:
        print_summary(sys.stdout, report)
    if errors:
        if args.debug or not isinstance(errors[0], SeqServeError):
            raise errors[0]
        sys.stderr.write(f"seqserve: error: {errors[0]}\n")
        return 1
    return 0


def _view(out: TextIO, rows: list[Progress], as_json: bool) -> View:
    if as_json:
        return JsonLines(out, rows)
    if out.isatty() and os.environ.get("TERM") != "dumb":
        return LiveView(out, rows)
    return PlainLines(out, rows)


async def _replay(
    client: AsyncClient,
    recording: Recording,
    row: Progress,
    view: View,
    args: argparse.Namespace,
    depth: int,
    step_timeout: float | None,
    model: str,
) -> None:
    """Send a recording frame by frame at ``args.rate`` Hz (0: as fast as ``depth`` allows),
    as a session of ``model`` on ``args.version`` (0: the latest)."""
    rate = args.rate
    try:
        async with client.session(model=model, version=args.version) as session:
            row.session_id = session.id
            row.model, row.version = session.model, session.version
            inflight: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue(depth)

            async def produce() -> None:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                try:
                    for i, frame in enumerate(recording.frames):
                        if rate > 0:
                            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
                        future = session.send_nowait(frame)
                        # after a first error the rest fail alike and are never awaited
                        future.add_done_callback(_retrieve)
                        await inflight.put(future)
                except SeqServeError as exc:
                    failed: asyncio.Future[Any] = loop.create_future()
                    failed.set_exception(exc)
                    await inflight.put(failed)
                await inflight.put(None)

            producer = asyncio.create_task(produce())
            try:
                while (future := await inflight.get()) is not None:
                    view.step(row, await asyncio.wait_for(future, step_timeout))
            finally:
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
            row.finished = True
    except TimeoutError:
        row.error = f"no answer within {step_timeout:.0f}s"
        raise DeadlineExceeded(f"{recording.name}: {row.error}") from None
    except SeqServeError as exc:
        row.error = str(exc)
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
