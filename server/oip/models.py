"""Which engine serves a model name and version: the one seam between the protocol fronts and
where models live.

Today a server holds one model (one ``Engine``); the model repository will hold several, each
with versions. Everything the Open Inference Protocol asks about models goes through
``ModelIndex`` (``resolve``, ``entries``, ``load``, ``unload``), so pointing it at the repository
changes this module only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..engine import Engine
from ..errors import SeqServeError
from ..model import ModelSpec

__all__ = ["ModelEntry", "ModelIndex", "ModelNotFound", "ModelUnavailable", "RepositoryError"]

State = Literal["READY", "UNAVAILABLE"]


class ModelNotFound(SeqServeError):
    """No such model (or version) on this server: NOT_FOUND / HTTP 404."""

    reason = "unknown_model"


class ModelUnavailable(SeqServeError):
    """The model is known but not loaded (unloaded, or the server is draining)."""

    reason = "model_unavailable"


class RepositoryError(SeqServeError):
    """A repository request this server cannot carry out (loading a model it does not hold)."""

    reason = "repository"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    version: str
    state: State
    reason: str = ""


class ModelIndex:
    """The models this server serves: today exactly one, the engine's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._unloaded = False  # withdrawn from the protocol fronts by an unload

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    def resolve(self, name: str, version: str = "") -> tuple[Engine, ModelSpec]:
        """The engine serving ``name`` at ``version`` ("" or "-1": the one served), ready for
        requests; ModelNotFound / ModelUnavailable otherwise."""
        spec = self.engine.spec
        if name != spec.name:
            raise ModelNotFound(
                f"unknown model {name!r}: this server serves {spec.name!r}"
                if name
                else f"no model name given: this server serves {spec.name!r}"
            )
        if version not in ("", "-1", spec.version):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}: this server serves version "
                f"{spec.version!r}",
                reason="unknown_version",
            )
        if self._unloaded:
            raise ModelUnavailable(
                f"model {name!r} is unloaded; load it again (repository load) to serve it"
            )
        return self.engine, spec

    def ready(self, name: str, version: str = "") -> bool:
        try:
            engine, _ = self.resolve(name, version)
        except SeqServeError:
            return False
        return not engine.draining

    def entries(self) -> list[ModelEntry]:
        spec = self.engine.spec
        if self._unloaded:
            return [ModelEntry(spec.name, spec.version, "UNAVAILABLE", "unloaded")]
        if self.engine.draining:
            return [ModelEntry(spec.name, spec.version, "UNAVAILABLE", "server is draining")]
        return [ModelEntry(spec.name, spec.version, "READY")]

    def load(self, name: str) -> None:
        """Serve ``name`` again after an unload (the served model is always in memory)."""
        self._served(name, "load")
        self._unloaded = False

    def unload(self, name: str) -> None:
        """Withdraw ``name`` from the protocol fronts: ModelReady false, inference refused.
        The engine and its sessions stay (the native API goes on serving them): freeing a
        model needs the model repository."""
        self._served(name, "unload")
        self._unloaded = True

    def _served(self, name: str, what: str) -> None:
        spec = self.engine.spec
        if name != spec.name:
            raise RepositoryError(
                f"cannot {what} model {name!r}: this server serves one model, {spec.name!r}, "
                "given at start (--model-dir); it has no model repository to "
                f"{what} others from",
                reason="unknown_model",
            )
