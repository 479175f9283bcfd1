"""The model repository on disk: ``ROOT/<model>/<version>/``, each version folder a model directory
(models/README.md), version folder names positive integers, and an optional per-model
``ROOT/<model>/config.json`` with the version policy.

This module only reads the folder: which models and versions there are, which versions the policy
wants served, and what is wrong with what is not servable (with the path and why). Loading is
``versions.py``'s business, serving ``models.py``'s.

A version policy says which versions of a model are served (the layout and the policies are the
ones Triton, TF Serving and OpenVINO Model Server use, so a repository made for them reads the
same way):

- ``{"version_policy": {"latest": N}}``: the N highest versions (the default, N = 1);
- ``{"version_policy": {"all": true}}``: every version;
- ``{"version_policy": {"specific": [1, 3]}}``: exactly those.

A policy lives with the model it governs (in the repository, versioned with it, like Triton's
``config.pbtxt``); ``--version-policy`` sets the default for models without one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

__all__ = [
    "ModelFolder",
    "Problem",
    "VersionPolicy",
    "VersionSource",
    "parse_policy",
    "scan",
    "single",
]

CONFIG = "config.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: str  # "latest", "all" or "specific"
    latest: int = 1
    versions: frozenset[int] = frozenset()

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions this policy serves out of ``available``."""
        found = sorted(set(available))
        if self.kind == "all":
            return set(found)
        if self.kind == "specific":
            return set(self.versions) & set(found)
        return set(found[-self.latest :]) if self.latest > 0 else set()

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in sorted(self.versions))
        return f"latest:{self.latest}"


def parse_policy(text: str) -> VersionPolicy:
    """``latest:N``, ``all`` or ``specific:1,3`` (the ``--version-policy`` flag)."""
    kind, _, rest = text.strip().partition(":")
    try:
        if kind == "all" and not rest:
            return VersionPolicy("all")
        if kind == "latest":
            n = int(rest or "1")
            if n >= 1:
                return VersionPolicy("latest", latest=n)
        if kind == "specific":
            versions = frozenset(int(v) for v in rest.split(",") if v.strip())
            if versions and min(versions) >= 1:
                return VersionPolicy("specific", versions=versions)
    except ValueError:
        pass
    raise ValueError(f"version policy {text!r}: expected latest:N, all or specific:V1,V2")


def _policy_from_config(config: object, where: Path) -> VersionPolicy:
    if not isinstance(config, dict):
        raise ModelError(f"{where}: expected a JSON object")
    policy = config.get("version_policy", {"latest": 1})
    if not isinstance(policy, dict) or len(policy) != 1:
        raise ModelError(f"{where}: version_policy must be one of latest / all / specific")
    ((kind, value),) = policy.items()
    if kind == "latest" and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return VersionPolicy("latest", latest=value)
    if kind == "all" and value is True:
        return VersionPolicy("all")
    if (
        kind == "specific"
        and isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return VersionPolicy("specific", versions=frozenset(value))
    raise ModelError(
        f"{where}: version_policy {policy!r}: expected {{'latest': N >= 1}}, {{'all': true}} "
        "or {'specific': [versions >= 1]}"
    )


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in the repository that cannot be served, and why."""

    path: Path
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


@dataclass(frozen=True, slots=True)
class VersionSource:
    """A version folder that looks servable (whether it loads is checked when it is loaded)."""

    model: str
    version: int
    path: Path
    # What the folder holds now (names, sizes, modification times): a version whose load
    # failed is tried again only once this changes (a copy completed, a file fixed).
    signature: tuple[tuple[str, int, int], ...] = ()


@dataclass(slots=True)
class ModelFolder:
    name: str
    policy: VersionPolicy
    versions: dict[int, VersionSource] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def wanted(self) -> set[int]:
        return self.policy.select(self.versions)


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in sorted(folder.iterdir()):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def _inside(path: Path, root: Path) -> bool:
    """``path`` (symlinks followed) lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def scan(
    root: Path, default_policy: VersionPolicy = VersionPolicy("latest")
) -> dict[str, ModelFolder]:
    """Every model folder under ``root``, with its servable versions and its problems. Raises
    ModelError only when ``root`` itself is unusable."""
    root = root.resolve()
    if not root.is_dir():
        raise ModelError(f"--model-repository {root}: not a directory")
    models: dict[str, ModelFolder] = {}
    for folder in sorted(root.iterdir()):
        if folder.name.startswith("."):
            continue
        if not folder.is_dir():
            continue
        name = folder.name
        model = ModelFolder(name, default_policy)
        models[name] = model
        if not _NAME.fullmatch(name):
            model.problems.append(Problem(folder, "model names are 1-128 of [A-Za-z0-9._-]"))
            continue
        if not _inside(folder, root):
            model.problems.append(Problem(folder, f"a link to outside the repository {root}"))
            continue
        config = folder / CONFIG
        if config.exists():
            try:
                if not _inside(config, root):
                    raise ModelError(f"{config}: a link to outside the repository {root}")
                model.policy = _policy_from_config(json.loads(config.read_text()), config)
            except (OSError, ValueError, ModelError) as exc:
                model.problems.append(Problem(config, str(exc).removeprefix(f"{config}: ")))
                model.policy = VersionPolicy("specific", versions=frozenset())
        for entry in sorted(folder.iterdir()):
            if entry.name == CONFIG or entry.name.startswith("."):
                continue
            if not entry.is_dir():
                model.problems.append(Problem(entry, "not a version folder (ignored)"))
                continue
            if not entry.name.isdigit() or int(entry.name) < 1:
                model.problems.append(Problem(entry, "version folder names are positive integers"))
                continue
            if not _inside(entry, root):
                model.problems.append(Problem(entry, f"a link to outside the repository {root}"))
                continue
            if not (entry / "model.json").is_file():
                model.problems.append(Problem(entry, "no model.json (yet): not a model directory"))
                continue
            version = int(entry.name)
            model.versions[version] = VersionSource(name, version, entry, _signature(entry))
    return models


def single(path: Path, name: str, version: int) -> dict[str, ModelFolder]:
    """A repository of one model directory (``--model-dir``, the bundled models)."""
    path = path.resolve()
    source = VersionSource(name, version, path, _signature(path))
    return {name: ModelFolder(name, VersionPolicy("all"), {version: source})}
