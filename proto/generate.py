"""Regenerate (or, with --check, verify) the committed protobuf/gRPC modules.

The .proto is compiled under the virtual path ``seqserve/proto/`` so the generated modules import
each other as ``seqserve.proto.*``. Needs grpcio-tools (the ``[dev]`` extra); its version sets the
``grpcio``/``protobuf`` floors in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("seqserve_pb2.py", "seqserve_pb2.pyi", "seqserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency

    args = [
        "protoc",
        f"-Iseqserve/proto={HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "seqserve/proto/seqserve.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in OUTPUTS:
            fresh = (Path(tmp) / "seqserve" / "proto" / name).read_text()
            target = HERE / name
            if opts.check:
                if not target.exists() or target.read_text() != fresh:
                    stale.append(name)
            else:
                target.write_text(fresh)
    if stale:
        print(f"stale generated files: {', '.join(stale)}; run python proto/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
