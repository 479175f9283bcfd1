"""The layer rules as a checked contract, read from the source files (every module, including one
added tomorrow, is covered without being listed here):

- the serving core (every module of server/ except the fronts: the gRPC and HTTP services, the
  process entry points, authentication) never imports grpc, aiohttp or the wire code in
  seqserve.proto, not even through another server module;
- client/ and export/ never import seqserve.server; proto/ imports none of the other packages;
- metrics does not import the scheduler (directly or not);
- work.py, the leaf of shared value types, imports numpy and the standard library only;
- no two modules import each other, directly or in a loop (the command-line entry lives in
  server/cli.py so that app and workers need not).

Imports are collected from the syntax tree (those inside functions too), relative ones resolved,
so nothing here imports the code it checks.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"server": "seqserve.server", "client": "seqserve.client", "export": "seqserve.export"}
PACKAGES["proto"] = "seqserve.proto"

# server/ modules that may speak a protocol or run the process: everything else is the core.
FRONTS = {"__init__", "__main__", "app", "auth", "cli", "servicer", "wire", "workers"}
FRONT_PACKAGES = {"oip"}  # the Open Inference Protocol's gRPC and REST fronts
# The wire: what the core must not import. seqserve.proto's generated gRPC module imports grpc.
WIRE = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "aiohttp", "seqserve.proto")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the four packages by its import name (``seqserve.server.engine``)."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The absolute names of the modules ``path`` (module ``name``) imports. ``from a import b``
    counts ``a.b`` when that is a module of ours, else ``a``."""
    known = set(known)
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                out.add(submodule if submodule in known else target)
    out.discard("__future__")
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports(name, path, files) for name, path in files.items()}


def is_front(module: str) -> bool:
    parts = module.split(".")
    if parts[:2] != ["seqserve", "server"]:
        return False
    rest = parts[2:]
    return not rest or rest[0] in FRONTS or rest[0] in FRONT_PACKAGES


def core_modules(deps: dict[str, set[str]]) -> list[str]:
    return sorted(m for m in deps if m.startswith("seqserve.server.") and not is_front(m))


def within(module: str, names: Iterable[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def reaches(deps: dict[str, set[str]], start: str, bad: Iterable[str]) -> list[str] | None:
    """An import chain from ``start`` to a module within ``bad``, through modules of ours."""
    bad = tuple(bad)
    seen = {start}
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for target in sorted(deps.get(path[-1], ())):
            if within(target, bad):
                return [*path, target]
            if target in deps and target not in seen:
                seen.add(target)
                paths.append([*path, target])
    return None


def violations(deps: dict[str, set[str]]) -> list[str]:
    found = []
    for module in core_modules(deps):
        chain = reaches(deps, module, WIRE)
        if chain is not None:
            found.append("core imports the wire: " + " -> ".join(chain))
    for module in sorted(deps):
        if within(module, ["seqserve.client", "seqserve.export"]):
            chain = reaches(deps, module, ["seqserve.server"])
            if chain is not None:
                found.append("client/export import the server: " + " -> ".join(chain))
        if within(module, ["seqserve.proto"]):
            bad = ["seqserve.server", "seqserve.client", "seqserve.export"]
            chain = reaches(deps, module, bad)
            if chain is not None:
                found.append("proto imports another package: " + " -> ".join(chain))
    chain = reaches(deps, "seqserve.server.metrics", ["seqserve.server.scheduler"])
    if chain is not None:
        found.append("metrics imports the scheduler: " + " -> ".join(chain))
    for target in sorted(deps.get("seqserve.server.work", ())):
        top = target.split(".")[0]
        if top != "numpy" and top not in sys.stdlib_module_names:
            found.append(f"work.py imports {target}: only numpy and the standard library")
    return found


def test_the_layer_rules_hold():
    deps = graph()
    assert "seqserve.server.engine" in core_modules(deps)
    assert "seqserve.server.servicer" not in core_modules(deps)
    assert violations(deps) == []


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Import loops among our modules (each found once, from its smallest module name)."""
    found = []
    for start in sorted(deps):
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for target in sorted(deps.get(module, ())):
                if target == start:
                    if min(path) == start:
                        found.append([*path, start])
                elif target in deps and target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_is_seen():
    """The rules are only as good as the module list: it comes from the files, fronts by name."""
    deps = graph()
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            if path.stem != "__init__":
                assert f"{package}.{path.stem}" in deps
    core = set(core_modules(deps))
    for must in ("engine", "scheduler", "sessions", "states", "runtime", "store", "handover"):
        assert f"seqserve.server.{must}" in core
    assert not any(m.startswith("seqserve.server.oip") for m in core)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a core module importing grpc, directly or lazily inside a function
        ({"server/engine.py": "import grpc\n"}, "core imports the wire"),
        ({"server/engine.py": "def f():\n    from grpc import aio\n"}, "core imports the wire"),
        # ... or through a front module, or the wire code
        (
            {"server/engine.py": "from . import servicer\n", "server/servicer.py": "import grpc\n"},
            "seqserve.server.engine -> seqserve.server.servicer -> grpc",
        ),
        ({"server/states.py": "from seqserve.proto import codec\n"}, "core imports the wire"),
        # a module nobody listed is core too
        ({"server/brand_new.py": "import aiohttp\n"}, "seqserve.server.brand_new -> aiohttp"),
        ({"client/x.py": "from seqserve.server import engine\n"}, "client/export import"),
        ({"export/x.py": "import seqserve.server.model\n"}, "client/export import"),
        ({"proto/x.py": "from seqserve.client import session\n"}, "proto imports"),
        (
            {
                "server/metrics.py": "from .observer import X\n",
                "server/observer.py": "from .scheduler import Y\n",
                "server/scheduler.py": "",
            },
            "metrics imports the scheduler",
        ),
        ({"server/work.py": "from .errors import E\n"}, "work.py imports seqserve.server.errors"),
        ({"server/work.py": "import pandas\n"}, "work.py imports pandas"),
    ],
)
def test_a_broken_rule_is_caught(tmp_path, files, expected):
    deps = graph(_tree(tmp_path, files))
    found = violations(deps)
    assert any(expected in v for v in found), found


def test_fronts_may_import_the_wire(tmp_path):
    files = {
        "server/servicer.py": "import grpc\nfrom .engine import E\n",
        "server/engine.py": "import numpy\n",
        "server/oip/grpc_front.py": "import grpc\nfrom ..engine import E\n",
        "server/work.py": "import time\nimport numpy as np\n",
    }
    assert violations(graph(_tree(tmp_path, files))) == []


def test_an_import_cycle_is_caught(tmp_path):
    """The one that was: app importing workers (for main) while workers import app."""
    files = {
        "server/app.py": "def main():\n    from .workers import run_workers\n",
        "server/workers.py": "from .app import run_forever\n",
        "server/engine.py": "from . import states\n",
        "server/states.py": "",
    }
    found = cycles(graph(_tree(tmp_path, files)))
    assert found == [["seqserve.server.app", "seqserve.server.workers", "seqserve.server.app"]]
