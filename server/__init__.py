"""seqserve.server: the gRPC service (needs the ``server`` extra)."""

from __future__ import annotations

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import prometheus_client  # noqa: F401
    from grpc_health.v1 import health  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"seqserve.server needs the 'server' extra ({exc.name} is missing): "
        "pip install 'seqserve[server]' (or 'seqserve[gpu]' for CUDA)"
    ) from exc

from .app import App, create_server, serve
from .cli import main
from .settings import Settings, parse_settings

__all__ = ["App", "Settings", "create_server", "main", "parse_settings", "serve"]
