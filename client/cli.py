"""The ``seqserve`` command: stream recordings live, batch-predict files, inspect the server."""

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
from .results import ModelInfo
from .retry import Backoff

__all__ = ["build_parser", "main"]

log = logging.getLogger("seqserve.client.cli")

DEFAULT_RATE = 10.0  # Hz: the BasicMotions sensors (100 steps = 10 s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve",
        description="Client of a seqserve server: stream recordings, batch "
        "predict, inspect the model.",
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

    predict = commands.add_parser("predict", help="whole-sequence (batch) inference")
    predict.add_argument(
        "sources", nargs="+", metavar="FILE", help="FILE.csv, FILE.npy, sample:N, samples[:K]"
    )
    predict.add_argument("--per-step", action="store_true", help="also every step's output")
    predict.add_argument("--format", choices=("csv", "json"), default="csv")
    predict.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")

    commands.add_parser("health", help="the server's health status (exit 0 when SERVING)")
    model = commands.add_parser("model", help="the served model's metadata")
    model.add_argument("--json", action="store_true")
    return parser


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
            _print_model(await client.model(), args.json)
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
    print(
        f"{info.name} v{info.version}: {info.features} features -> {len(info.labels)} labels "
        f"({', '.join(info.labels)})"
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
