"""Server settings: one typed object. Every field is a CLI flag and a ``SEQSERVE_*`` variable.

Precedence: command line, then environment, then the default here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Settings", "parse_settings"]

ENV_PREFIX = "SEQSERVE_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _opt("0.0.0.0", "address to bind the gRPC server to")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = _opt(8081, "Prometheus /metrics HTTP port (0 picks a free one, -1 off)")
    http_port: int = _opt(
        8000,
        "Open Inference Protocol REST port (KServe v2 /v2/..., what tritonclient.http and "
        "KServe clients speak; 0 picks a free one, -1 off)",
    )
    model_dir: str = _opt(
        "", "one model directory (seqserve-model/1) to serve, instead of a repository"
    )
    model_repository: str = _opt(
        "",
        "model repository: DIR/<model>/<version>/ folders, each a model directory; empty (and "
        "no --model-dir): the bundled models",
    )
    default_model: str = _opt(
        "basicmotions", "the model a request gets when it names none (with --model-dir: that one)"
    )
    version_policy: str = _opt(
        "latest:1",
        "which versions of a model are served, for models whose config.json sets none: "
        "latest:N, all, or specific:V1,V2",
    )
    version_drain_timeout: float = _opt(
        3600.0,
        "seconds a version out of the policy keeps serving the sessions pinned to it; then "
        "they end (version_retired). 0: until its last session ends",
    )
    repository_poll: float = _opt(
        0.0, "check the repository for added or removed versions every this many seconds (0: off)"
    )
    serving_mode: str = _opt(
        "auto",
        "what sessions are answered on: 'window' (the last T frames, as a model trained on "
        "fixed windows of T frames was trained: model.json window), 'stateful' (everything "
        "since the session started), 'auto' (window for window-trained models, stateful for the "
        "others), or per model: NAME=MODE,NAME=MODE (the rest auto)",
    )
    admin_principals: str = _opt(
        "",
        "with authentication on: comma-separated principals that may load and unload models",
    )
    device: str = _opt(
        "cpu",
        "cpu, or cuda (onnxruntime-gpu; refuses to start on CPU fallback)",
        choices=("cpu", "cuda"),
    )
    max_sessions: int = _opt(100_000, "cap on live sessions; opening more is refused at once")
    session_idle_timeout: float = _opt(600.0, "seconds without a request before a session expires")
    max_batch: int = _opt(256, "most session steps in one onnxruntime call")
    max_wait_ms: float = _opt(
        0.0,
        "wait up to this long for a step batch to fill (0: take what "
        "queued while the previous batch ran)",
    )
    inline_batch: int = _opt(
        8,
        "batches of at most this many frames in all run on the event "
        "loop thread; larger ones in a worker thread (0: always the worker)",
    )
    max_frames_per_request: int = _opt(4096, "most frames in one step request or one sequence")
    max_message_bytes: int = _opt(16 * 1024 * 1024, "largest gRPC message accepted or sent")
    max_predict_frames: int = _opt(1_048_576, "most frames in all sequences of one Predict call")
    replay_window: int = _opt(64, "frames of recent outputs kept per session to answer retries")
    stream_inflight: int = _opt(1024, "requests one stream may have queued before reads pause")
    snapshot_path: str = _opt(
        "",
        "file to save every session to on drain (and every --snapshot-interval) and restore "
        "them from at start, so a restart loses none; one server per file (a second one is "
        "refused: the file is locked). Empty: sessions live in this process's memory only, "
        "and a restart loses them (clients are told: NOT_FOUND). The Docker image sets "
        "/var/lib/seqserve/sessions.npz",
    )
    snapshot_interval: float = _opt(
        30.0,
        "with --snapshot-path, also save sessions every this many seconds while "
        "serving, bounding what a crash (kill -9) loses; 0: only "
        "on drain",
    )
    ignore_bad_snapshot: bool = _opt(
        False, "start empty when the snapshot cannot be restored (default: refuse to start)"
    )
    drain_grace: float = _opt(20.0, "seconds to finish in-flight requests on SIGTERM/SIGINT")
    ort_threads: int = _opt(1, "onnxruntime intra-op threads per graph")
    ort_spinning: bool = _opt(False, "let onnxruntime threads spin-wait (raises p99 under load)")
    reflection: bool = _opt(
        True, "enable gRPC server reflection (behind authentication when it is on)"
    )
    tls_cert: str = _opt("", "PEM certificate chain of the server; with --tls-key serves TLS")
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt(
        "",
        "PEM CA bundle: require client certificates signed by it "
        "(mutual TLS; the certificate's CN names the caller when it "
        "sends no token)",
    )
    tokens_file: str = _opt(
        "",
        "file of 'principal:token' lines ('#' comments): a call must "
        "send 'authorization: Bearer <token>' and acts as that principal",
    )
    auth_token: str = _opt(
        "",
        "one accepted bearer token, principal 'default' (prefer the "
        "environment variable: flags show in ps)",
    )
    max_sessions_per_principal: int = _opt(0, "cap on one principal's live sessions (0: none)")
    store: str = _opt(
        "memory",
        "where sessions live: 'memory' (this process only) or "
        "redis://HOST:PORT/DB, checkpoints shared by every replica so any of "
        "them can resume a session",
    )
    checkpoint_every: int = _opt(
        1,
        "with a shared store: save a session's state every this many "
        "frames (1: every frame, nothing is ever lost; K: a replica "
        "dying loses at most the last K-1 frames, and says so)",
    )
    replica_id: str = _opt("", "this replica's name in the shared store (default host:pid)")
    store_timeout: float = _opt(0.5, "seconds to wait for the shared store per call")
    store_retry: float = _opt(
        1.0, "after the store failed, serve from memory this many seconds before trying it again"
    )
    workers: int = _opt(
        1,
        "worker processes sharing the port (SO_REUSEPORT); more than one "
        "needs --store redis://... so a session can move between them",
    )
    reuse_port: bool = _opt(
        False,
        "bind with SO_REUSEPORT, sharing the port with other "
        "processes (what --workers does for its workers; they must share "
        "a --store)",
    )
    loop: str = _opt(
        "auto",
        "the event loop: uvloop (libuv's, in C: fewer microseconds per message), asyncio (the "
        "standard library's), or auto (uvloop where it is installed, as with seqserve[server] "
        "off Windows)",
        choices=("auto", "asyncio", "uvloop"),
    )
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "empty"


def build_parser(prog: str = "seqserve-server") -> argparse.ArgumentParser:
    # Defaults are argparse.SUPPRESS, so a flag left out falls back to the environment and
    # then to Settings; the help text names each real default itself.
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a stateful sequence model over gRPC. Every flag can also be set with "
        f"the environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MAX_SESSIONS), which "
        "a flag overrides. Sessions live in memory; only --snapshot-path (a file) or --store "
        "(Redis) keeps them across a restart, and nothing else is written to disk.",
    )
    for f in dataclasses.fields(Settings):
        kind = type(f.default)
        help_text = (
            f"{f.metadata['help']} (default: {_shown(f.default)}) [{_env_name(f.name)}]"
        ).replace("%", "%%")
        if kind is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                type=kind,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                help=help_text,
            )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags and ``SEQSERVE_*`` variables; bad values exit with a usage error."""
    parser = build_parser()
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = environ.get(_env_name(f.name))
        if raw is None:
            continue
        try:
            value = _convert(type(f.default), raw)
        except ValueError as exc:
            parser.error(f"{_env_name(f.name)}: {exc}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            parser.error(f"{_env_name(f.name)}: {value!r} is not one of {', '.join(choices)}")
        values[f.name] = value
    values.update(vars(parser.parse_args(argv)))
    settings = Settings(**values)
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def validate(settings: Settings) -> list[str]:
    problems = _validate(settings)
    from .repository import parse_policy

    try:
        parse_policy(settings.version_policy)
    except ValueError as exc:
        problems.append(f"--version-policy: {exc}")
    try:
        serving_modes(settings.serving_mode)
    except ValueError as exc:
        problems.append(f"--serving-mode: {exc}")
    if settings.model_dir and settings.model_repository:
        problems.append("--model-dir and --model-repository: give one")
    for name in ("version_drain_timeout", "repository_poll"):
        if getattr(settings, name) < 0:
            problems.append(f"{_flag(name)} must not be negative")
    return problems


def _validate(settings: Settings) -> list[str]:
    problems = []
    for name in (
        "max_sessions",
        "max_batch",
        "max_frames_per_request",
        "max_message_bytes",
        "replay_window",
        "stream_inflight",
        "ort_threads",
        "max_predict_frames",
        "checkpoint_every",
        "workers",
    ):
        if getattr(settings, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1")
    for name in ("session_idle_timeout", "drain_grace"):
        if getattr(settings, name) <= 0:
            problems.append(f"{_flag(name)} must be positive")
    if settings.snapshot_interval < 0:
        problems.append("--snapshot-interval must not be negative")
    for name in ("metrics_port", "http_port"):
        if getattr(settings, name) < -1:
            problems.append(f"{_flag(name)} must be a port, 0 (any free one) or -1 (off)")
    if settings.max_wait_ms < 0:
        problems.append("--max-wait-ms must not be negative")
    if settings.max_sessions_per_principal < 0:
        problems.append("--max-sessions-per-principal must not be negative")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("--tls-cert and --tls-key go together")
    if settings.tls_client_ca and not settings.tls_cert:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    if settings.store != "memory" and not settings.store.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        problems.append("--store must be 'memory' or a redis://, rediss:// or unix:// URL")
    if settings.workers > 1 and settings.port == 0:
        problems.append("--workers above 1 needs a fixed --port for the workers to share")
    if (settings.workers > 1 or settings.reuse_port) and settings.store == "memory":
        problems.append(
            "--workers above 1 (and --reuse-port) need --store redis://...: a "
            "client reconnecting may reach another process, which must be able to "
            "resume its session"
        )
    for name in ("store_timeout", "store_retry"):
        if getattr(settings, name) <= 0:
            problems.append(f"{_flag(name)} must be positive")
    return problems


MODES = ("auto", "stateful", "window")


def serving_modes(text: str) -> dict[str, str]:
    """``--serving-mode``: {"": mode for every model} or {model: mode, ...}."""
    text = text.strip()
    if text in MODES:
        return {"": text}
    modes: dict[str, str] = {}
    for part in text.split(","):
        name, sep, mode = part.strip().partition("=")
        if not sep or not name or mode not in MODES:
            raise ValueError(
                f"{text!r}: expected auto, stateful, window or NAME=MODE,... (modes: "
                f"{', '.join(MODES)})"
            )
        modes[name] = mode
    return modes


def serving_mode(settings: Settings, model: str) -> str:
    modes = serving_modes(settings.serving_mode)
    return modes.get(model, modes.get("", "auto"))
