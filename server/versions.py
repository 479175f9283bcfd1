"""A model version as the server holds it: loaded and checked graphs, and the engine that serves
the sessions pinned to it.

Loading reads and checks everything before a version may serve: the graphs' checksums against
``model.json`` (a folder copied halfway fails here), the graphs' inputs and outputs against the
states ``model.json`` declares, and the version's own ``reference.npz`` reproduced by both graphs
within 1e-5. It runs in a thread of its own, off the event loop and off the inference thread, so
serving goes on meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .engine import Engine
from .errors import ModelError
from .model import ModelSpec, load_model_spec
from .repository import VersionSource
from .runtime import ModelRunner, Runtime
from .settings import Settings, serving_mode
from .window import WindowRuntime

__all__ = ["REFERENCE_TOLERANCE", "ModelVersion", "VersionState", "check_reference", "load_graphs"]

log = logging.getLogger("seqserve.versions")

REFERENCE_TOLERANCE = 1e-5

# loading: being read and checked; ready: serves new and pinned sessions; draining: out of the
# version policy (or unloaded), serves only the sessions pinned to it; unavailable: not
# servable (its load failed, or it was released), with the reason.
VersionState = Literal["loading", "ready", "draining", "unavailable"]


@dataclass(eq=False)
class ModelVersion:
    model: str
    number: int
    state: VersionState = "loading"
    source: VersionSource | None = None
    engine: Engine | None = None
    reason: str = ""
    load_seconds: float = 0.0
    draining_since: float | None = None
    failed_signature: tuple[tuple[str, int, int], ...] | None = None
    changed_at: float = field(default_factory=time.monotonic)

    @property
    def spec(self) -> ModelSpec:
        assert self.engine is not None, "not loaded"
        return self.engine.spec

    @property
    def fingerprint(self) -> str:
        return self.engine.spec.fingerprint if self.engine is not None else ""

    @property
    def sessions(self) -> int:
        return len(self.engine.table) if self.engine is not None else 0

    @property
    def serving(self) -> bool:
        """Holds an engine that answers its sessions."""
        return self.engine is not None and self.state in ("ready", "draining")

    def set_state(self, state: VersionState, reason: str = "") -> None:
        self.state, self.reason = state, reason
        self.changed_at = time.monotonic()


def check_reference(
    spec: ModelSpec, runtime: ModelRunner, tolerance: float = REFERENCE_TOLERANCE
) -> float:
    """Reproduce the version's ``reference.npz`` with both graphs (whole sequences through the
    sequence graph, the first recording frame by frame through the step graph); the largest
    difference. ModelError if it is missing or over ``tolerance``."""
    path = spec.directory / "reference.npz"
    try:
        with path.open("rb") as fh, np.load(fh) as data:  # numpy leaks its own handle on errors
            x, lengths, expected = data["x"], data["lengths"], data["probabilities"]
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (a version must carry its reference outputs)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    if x.ndim != 3 or x.shape[-1] != spec.features or expected.shape[-1] != spec.classes:
        raise ModelError(
            f"{path}: shapes {x.shape} / {expected.shape} do not fit {spec.features} features "
            f"and {spec.classes} classes"
        )
    # A window model's reference holds its window answers; served stateful (an override), its
    # answers agree with them only before the window fills, so only those are compared.
    if spec.window and spec.mode != "window":
        lengths = np.minimum(lengths, spec.window)
    worst = 0.0
    for i, n in enumerate(lengths.tolist()):
        frames = np.ascontiguousarray(x[i : i + 1, :n], np.float32)
        probs, _ = runtime.sequence(frames, runtime.zero_states(1))
        worst = max(worst, float(np.abs(probs[0] - expected[i, :n]).max()))
        if i == 0:
            states = runtime.zero_states(1)
            for t in range(n):
                step, states = runtime.step(
                    np.ascontiguousarray(frames[:, t]), states, np.array([t])
                )
                worst = max(worst, float(np.abs(step[0] - expected[i, t]).max()))
    if not np.isfinite(worst) or worst > tolerance:
        raise ModelError(
            f"{path}: the graphs differ from the reference outputs by {worst:.3g} "
            f"(> {tolerance:g}): model.json, graphs and reference do not belong together"
        )
    return worst


def load_graphs(
    source: VersionSource | Path, settings: Settings, *, strict: bool
) -> tuple[ModelSpec, ModelRunner, float]:
    """Read and check a version's folder, load its graphs (blocking: call in a thread). With
    ``strict`` (repository versions) model.json must give the graphs' checksums and the
    reference must be there and reproduced. Returns the spec, runtime and seconds taken."""
    started = time.perf_counter()
    if isinstance(source, VersionSource):
        spec = load_model_spec(
            source.path,
            name=source.model,
            version=str(source.version),
            require_checksums=strict,
        )
    else:
        spec = load_model_spec(source)
    runtime = Runtime(
        spec, device=settings.device, threads=settings.ort_threads, spinning=settings.ort_spinning
    )
    mode = serving_mode(settings, spec.name)
    window = spec.window if mode in ("auto", "window") else 0
    if mode == "window" and not window:
        raise ModelError(
            f"{spec.directory}: --serving-mode window needs a window-trained model (model.json "
            "window: T, which seqserve-export convert records)"
        )
    runner: ModelRunner = WindowRuntime(runtime, window) if window else runtime
    if strict or (spec.directory / "reference.npz").exists():
        worst = check_reference(spec, runner)
        log.debug("%s v%s reproduces its reference within %.2g", spec.name, spec.version, worst)
    return runner.spec, runner, time.perf_counter() - started
