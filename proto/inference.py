"""The Open Inference Protocol's messages (package ``inference``), from a descriptor pool of their
own.

protoc's generated Python would register ``inference.ModelInferRequest`` and friends in
protobuf's default pool, where ``tritonclient.grpc`` registers its own copy of the same names: a
process importing both would fail with "duplicate symbol". So proto/generate.py commits the
compiled descriptor (``inference_descriptor.py``) and this module builds the classes from it in
a private pool. The wire is the same: only field numbers and types travel.
"""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf import descriptor_pool, message_factory

from .inference_descriptor import FILE_DESCRIPTOR

__all__ = ["METHODS", "SERVICE", "message_class"]

SERVICE = "inference.GRPCInferenceService"

_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.AddSerializedFile(FILE_DESCRIPTOR)


def message_class(name: str) -> Any:
    """The message class of ``inference.<name>`` (nested ones as ``Outer.Inner``)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"inference.{name}"))


Kind = Literal["unary", "stream"]


def _methods() -> dict[str, tuple[Kind, Any, Any]]:
    service = _POOL.FindServiceByName(SERVICE)
    return {
        method.name: (
            "stream" if method.client_streaming else "unary",
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )
        for method in service.methods
    }


# What seqserve serves: method name -> (kind, request class, response class).
METHODS: dict[str, tuple[Kind, Any, Any]] = _methods()

ServerLiveResponse = message_class("ServerLiveResponse")
ServerReadyResponse = message_class("ServerReadyResponse")
ModelReadyResponse = message_class("ModelReadyResponse")
ServerMetadataResponse = message_class("ServerMetadataResponse")
ModelMetadataResponse = message_class("ModelMetadataResponse")
InferParameter = message_class("InferParameter")
ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
ModelStreamInferResponse = message_class("ModelStreamInferResponse")
ModelConfigResponse = message_class("ModelConfigResponse")
ModelConfig = message_class("ModelConfig")
ModelStatisticsResponse = message_class("ModelStatisticsResponse")
RepositoryIndexResponse = message_class("RepositoryIndexResponse")
RepositoryModelLoadResponse = message_class("RepositoryModelLoadResponse")
RepositoryModelUnloadResponse = message_class("RepositoryModelUnloadResponse")
TYPE_FP32: int = _POOL.FindEnumTypeByName("inference.DataType").values_by_name["TYPE_FP32"].number
