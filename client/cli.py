"""The ``seqserve`` command: stream recordings live, batch-predict files, inspect the server and
its models (list, load, unload)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aio import DEFAULT_TARGET, AsyncClient
from .batch import predict_command
from .errors import InvalidInput, SeqServeError
from .inputs import InputError
from .replay import stream_command
from .results import ModelInfo, ModelList
from .retry import Backoff

__all__ = ["build_parser", "main"]

log = logging.getLogger("seqserve.client.cli")

DEFAULT_RATE = 10.0  # Hz: the BasicMotions sensors (100 steps = 10 s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve",
        description="Client of a seqserve server: stream recordings, batch "
        "predict, inspect, load and unload models.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("SEQSERVE_TARGET", DEFAULT_TARGET),
        help="server address host:port [SEQSERVE_TARGET] (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SEQSERVE_TOKEN"),
        help="bearer token sent with every call [SEQSERVE_TOKEN]",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS (system root certificates)")
    parser.add_argument("--ca", metavar="PEM", help="use TLS with this root certificate file")
    parser.add_argument(
        "--cert", metavar="PEM", help="client certificate for mutual TLS (implies TLS; needs --key)"
    )
    parser.add_argument("--key", metavar="PEM", help="private key of --cert")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds per call and per step answer (default %(default)s)",
    )
    parser.add_argument(
        "--resume-for",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep trying to resume a dropped stream this long (default %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stream = commands.add_parser(
        "stream",
        help="replay recordings as live sessions",
        description="Replay recordings frame by frame as sessions (several sources or "
        "samples[:K]: concurrent sessions multiplexed on one stream).",
    )
    stream.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="FILE.csv (rows = frames), FILE.npy, sample:N, samples[:K]",
    )
    stream.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        metavar="HZ",
        help="frames per second per session (default %(default)s, the sensor "
        "rate; 0 = as fast as possible)",
    )
    stream.add_argument(
        "--depth",
        type=int,
        default=16,
        help="most unanswered sends per session (pipelining, default %(default)s)",
    )
    stream.add_argument("--json", action="store_true", help="JSON lines instead of text")
    _model_options(stream, "start the sessions on this version (default: the latest ready)")

    predict = commands.add_parser("predict", help="whole-sequence (batch) inference")
    predict.add_argument(
        "sources", nargs="+", metavar="FILE", help="FILE.csv, FILE.npy, sample:N, samples[:K]"
    )
    predict.add_argument("--per-step", action="store_true", help="also every step's output")
    predict.add_argument("--format", choices=("csv", "json"), default="csv")
    predict.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    _model_options(predict, "run on this version (default: the latest ready)")

    commands.add_parser("health", help="the server's health status (exit 0 when SERVING)")
    model = commands.add_parser("model", help="a served model's metadata")
    model.add_argument("--json", action="store_true")
    _model_options(model, "this version's (default: the latest ready)")

    models = commands.add_parser(
        "models",
        help="every model and version the server holds",
        description="Every model and version: state (loading, ready, draining, unavailable), "
        "live sessions, whether new sessions go to it (latest) and whether it is the default "
        "model, the reason for its state; then what in the repository cannot be served.",
    )
    models.add_argument("--json", action="store_true")
    for name, what in (
        ("load", "load a model from the server's repository (its policy's versions, or one)"),
        ("unload", "drain a model's versions (or one): pinned sessions finish on them"),
    ):
        command = commands.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]}.")
        command.add_argument("model", metavar="MODEL")
        command.add_argument(
            "--version", type=_version, default=0, metavar="N", help="only this version"
        )
        command.add_argument("--json", action="store_true", help="the models afterwards as JSON")
    return parser


def _model_options(parser: argparse.ArgumentParser, version_help: str) -> None:
    parser.add_argument(
        "--model",
        default=os.environ.get("SEQSERVE_MODEL", ""),
        metavar="NAME",
        help="the model (default: the server's default model) [SEQSERVE_MODEL]",
    )
    parser.add_argument("--version", type=_version, default=0, metavar="N", help=version_help)


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a version is a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    cert = Path(args.cert).read_bytes() if args.cert else None
    key = Path(args.key).read_bytes() if args.key else None
    retry = Backoff(max_elapsed=args.resume_for)
    async with AsyncClient(
        args.target,
        token=args.token,
        tls=tls,
        timeout=args.timeout or None,
        retry=retry,
        cert=cert,
        key=key,
    ) as client:
        if args.command == "health":
            status = await client.health()
            print(status)
            return 0 if status == "SERVING" else 1
        if args.command == "model":
            _print_model(await client.model(args.model, version=args.version), args.json)
            return 0
        if args.command == "models":
            _print_models(await client.models(), args.json)
            return 0
        if args.command == "load":
            listed = await client.load_model(args.model, args.version)
            _print_models(listed, args.json, only=args.model)
            return 0
        if args.command == "unload":
            listed = await client.unload_model(args.model, args.version)
            _print_models(listed, args.json, only=args.model)
            return 0
        if args.command == "predict":
            return await predict_command(client, args)
        return await stream_command(client, args)


def _print_model(info: ModelInfo, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "name": info.name,
                    "version": info.version,
                    "state": info.state,
                    "latest": info.latest,
                    "fingerprint": info.fingerprint,
                    "serving_mode": info.serving_mode,
                    "window": info.window,
                    "features": info.features,
                    "labels": list(info.labels),
                    "parameters": info.parameters,
                    "state_bytes": info.state_bytes,
                    "device": info.device,
                    "max_frames_per_request": info.max_frames_per_request,
                    "session_idle_timeout": info.session_idle_timeout,
                    "layers": list(info.layers),
                    "states": list(info.states),
                },
                indent=2,
            )
        )
        return
    state = f" [{info.state}{', latest' if info.latest else ''}]" if info.state else ""
    print(
        f"{info.name} v{info.version}{state}: {info.features} features -> "
        f"{len(info.labels)} labels ({', '.join(info.labels)})"
    )
    for layer in info.layers:
        print(
            f"  {layer['name']:<12} {layer['type']:<6} units={layer['units']:<4} "
            f"in={layer['input_size']:<4} params={layer['parameters']} "
            f"{layer['activation'] or ''}".rstrip()
        )
    print(
        f"parameters {info.parameters}, state {info.state_bytes} bytes/session, "
        f"device {info.device}, at most {info.max_frames_per_request} frames/request, "
        f"sessions expire after {info.session_idle_timeout:g}s idle"
    )
    if info.serving_mode == "window":
        print(f"answers on the last {info.window} frames (window-trained model)")
    if info.fingerprint:
        print(f"graphs {info.fingerprint}")


def _print_models(listed: ModelList, as_json: bool, only: str = "") -> None:
    """The ``models`` table (``load`` / ``unload``: the one model's lines)."""
    versions = [v for v in listed.versions if not only or v.model == only]
    if as_json:
        print(
            json.dumps(
                {
                    "default_model": listed.default_model,
                    "versions": [
                        {
                            "model": v.model,
                            "version": v.version,
                            "state": v.state,
                            "sessions": v.sessions,
                            "latest": v.latest,
                            "default": v.default,
                            "reason": v.reason,
                            "fingerprint": v.fingerprint,
                            "load_seconds": round(v.load_seconds, 4),
                        }
                        for v in versions
                    ],
                    "problems": [{"path": p.path, "why": p.why} for p in listed.problems],
                },
                indent=2,
            )
        )
        return
    rows = [("MODEL", "VERSION", "STATE", "SESSIONS", "FLAGS", "REASON")]
    for v in versions:
        flags = ",".join(f for f, on in (("latest", v.latest), ("default", v.default)) if on)
        rows.append((v.model, str(v.version), v.state, str(v.sessions), flags or "-", v.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[5]]).rstrip())
    if not versions:
        print(f"(no versions{f' of {only}' if only else ''})")
    for problem in listed.problems:
        print(f"problem: {problem.path}: {problem.why}")
