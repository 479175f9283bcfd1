"""The ``seqserve`` command: stream recordings live, batch-predict files, inspect the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .aio import DEFAULT_TARGET, AsyncClient
from .errors import DeadlineExceeded, InvalidInput, SeqServeError
from .inputs import InputError, Recording, load_recordings
from .live import JsonLines, LiveView, PlainLines, Progress, View, print_summary, summary
from .results import ModelInfo
from .retry import Backoff

__all__ = ["build_parser", "main"]

log = logging.getLogger("seqserve.client.cli")

DEFAULT_RATE = 10.0  # Hz: the BasicMotions sensors (100 steps = 10 s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve", description="Client of a seqserve server: stream recordings, batch "
        "predict, inspect the model.")
    parser.add_argument("--target", default=os.environ.get("SEQSERVE_TARGET", DEFAULT_TARGET),
                        help="server address host:port [SEQSERVE_TARGET] (default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("SEQSERVE_TOKEN"),
                        help="bearer token sent with every call [SEQSERVE_TOKEN]")
    parser.add_argument("--tls", action="store_true", help="use TLS (system root certificates)")
    parser.add_argument("--ca", metavar="PEM", help="use TLS with this root certificate file")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds per call and per step answer (default %(default)s)")
    parser.add_argument("--resume-for", type=float, default=60.0, metavar="SECONDS",
                        help="keep trying to resume a dropped stream this long (default "
                        "%(default)s)")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stream = commands.add_parser(
        "stream", help="replay recordings as live sessions",
        description="Replay recordings frame by frame as sessions (several sources or "
        "samples[:K]: concurrent sessions multiplexed on one stream).")
    stream.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="FILE.csv (rows = frames), FILE.npy, sample:N, samples[:K]")
    stream.add_argument("--rate", type=float, default=DEFAULT_RATE, metavar="HZ",
                        help="frames per second per session (default %(default)s, the sensor "
                        "rate; 0 = as fast as possible)")
    stream.add_argument("--depth", type=int, default=16,
                        help="most unanswered sends per session (pipelining, default "
                        "%(default)s)")
    stream.add_argument("--json", action="store_true", help="JSON lines instead of text")

    predict = commands.add_parser("predict", help="whole-sequence (batch) inference")
    predict.add_argument("sources", nargs="+", metavar="FILE",
                         help="FILE.csv, FILE.npy, sample:N, samples[:K]")
    predict.add_argument("--per-step", action="store_true", help="also every step's output")
    predict.add_argument("--format", choices=("csv", "json"), default="csv")
    predict.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")

    commands.add_parser("health", help="the server's health status (exit 0 when SERVING)")
    model = commands.add_parser("model", help="the served model's metadata")
    model.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except (SeqServeError, InputError, OSError) as exc:
        if args.debug:
            raise
        _fail(str(exc))
        return 2 if isinstance(exc, (InputError, OSError, InvalidInput)) else 1
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return 1


def _fail(message: str) -> None:
    sys.stderr.write(f"seqserve: error: {message}\n")


async def _run(args: argparse.Namespace) -> int:
    tls: Any = None
    if args.ca:
        tls = Path(args.ca).read_bytes()
    elif args.tls:
        tls = True
    retry = Backoff(max_elapsed=args.resume_for)
    async with AsyncClient(args.target, token=args.token, tls=tls, timeout=args.timeout or None,
                           retry=retry) as client:
        if args.command == "health":
            status = await client.health()
            print(status)
            return 0 if status == "SERVING" else 1
        if args.command == "model":
            _print_model(await client.model(), args.json)
            return 0
        if args.command == "predict":
            return await _predict(client, args)
        return await _stream(client, args)


# -- model ------------------------------------------------------------------------------------

def _print_model(info: ModelInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": info.name, "version": info.version, "features": info.features,
                          "labels": list(info.labels), "parameters": info.parameters,
                          "state_bytes": info.state_bytes, "device": info.device,
                          "max_frames_per_request": info.max_frames_per_request,
                          "session_idle_timeout": info.session_idle_timeout,
                          "layers": list(info.layers), "states": list(info.states)}, indent=2))
        return
    print(f"{info.name} v{info.version}: {info.features} features -> {len(info.labels)} labels "
          f"({', '.join(info.labels)})")
    for layer in info.layers:
        print(f"  {layer['name']:<12} {layer['type']:<6} units={layer['units']:<4} "
              f"in={layer['input_size']:<4} params={layer['parameters']} "
              f"{layer['activation'] or ''}".rstrip())
    print(f"parameters {info.parameters}, state {info.state_bytes} bytes/session, "
          f"device {info.device}, at most {info.max_frames_per_request} frames/request, "
          f"sessions expire after {info.session_idle_timeout:g}s idle")


# -- predict ----------------------------------------------------------------------------------

async def _predict(client: AsyncClient, args: argparse.Namespace) -> int:
    recordings = [r for source in args.sources for r in load_recordings(source)]
    model = await client.model()
    _check_features(recordings, model)
    results = await client.predict([r.frames for r in recordings], per_step=args.per_step)
    buffer = io.StringIO()
    if args.format == "json":
        records = []
        for rec, res in zip(recordings, results, strict=True):
            record: dict[str, Any] = {
                "source": rec.name, "label": res.label, "confidence": round(res.confidence, 6),
                "probabilities": dict(zip(model.labels, map(_num, res.probabilities),
                                          strict=True))}
            if rec.truth is not None:
                record["truth"] = _truth(rec.truth, model)
            if res.per_step is not None:
                record["per_step"] = [[_num(v) for v in row] for row in res.per_step]
            records.append(record)
        buffer.write(json.dumps(records, indent=2) + "\n")
    else:
        writer = csv.writer(buffer, lineterminator="\n")
        truths = any(r.truth is not None for r in recordings)
        head = ["source", *(["step"] if args.per_step else []), "label", "confidence",
                *(["truth"] if truths else []), *model.labels]
        writer.writerow(head)
        for rec, res in zip(recordings, results, strict=True):
            truth = [_truth(rec.truth, model) if rec.truth is not None else ""] if truths else []
            if res.per_step is None:
                writer.writerow([rec.name, res.label, _num(res.confidence), *truth,
                                 *map(_num, res.probabilities)])
                continue
            for step, row in enumerate(res.per_step):
                top = int(row.argmax())
                writer.writerow([rec.name, step, model.labels[top], _num(row[top]), *truth,
                                 *map(_num, row)])
    if args.output:
        Path(args.output).write_text(buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())
    return 0


def _num(value: Any) -> float:
    return round(float(value), 6)


def _truth(value: str | int, model: ModelInfo) -> str:
    if isinstance(value, int) and 0 <= value < len(model.labels):
        return model.labels[value]
    return str(value)


def _check_features(recordings: list[Recording], model: ModelInfo) -> None:
    for rec in recordings:
        if rec.frames.shape[1] != model.features:
            raise InvalidInput(f"{rec.name}: {rec.frames.shape[1]} features per frame, model "
                               f"{model.name!r} expects {model.features}",
                               reason="feature_count")


# -- stream -----------------------------------------------------------------------------------

async def _stream(client: AsyncClient, args: argparse.Namespace) -> int:
    recordings = [r for source in args.sources for r in load_recordings(source)]
    model = await client.model()
    _check_features(recordings, model)
    rows = [Progress(r.name, len(r.frames),
                     _truth(r.truth, model) if r.truth is not None else None)
            for r in recordings]
    view = _view(sys.stdout, rows, args.json)
    # an answer may wait for a resume: allow the whole resume budget on top of the timeout
    step_timeout = args.timeout + args.resume_for if args.timeout else None
    started = time.perf_counter()
    try:
        outcomes = await asyncio.gather(
            *(_replay(client, rec, row, view, args.rate, max(1, args.depth), step_timeout)
              for rec, row in zip(recordings, rows, strict=True)),
            return_exceptions=True)
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
        _fail(str(errors[0]))
        return 1
    return 0


def _view(out: TextIO, rows: list[Progress], as_json: bool) -> View:
    if as_json:
        return JsonLines(out, rows)
    if out.isatty() and os.environ.get("TERM") != "dumb":
        return LiveView(out, rows)
    return PlainLines(out, rows)


async def _replay(client: AsyncClient, recording: Recording, row: Progress, view: View,
                  rate: float, depth: int, step_timeout: float | None) -> None:
    """Send a recording frame by frame at ``rate`` Hz (0: as fast as ``depth`` allows)."""
    try:
        async with client.session() as session:
            row.session_id = session.id
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
