"""The Open Inference Protocol's wire names, shared by our client and our server.

Our messages live in the protobuf package `moduleserve.oip.v2`, so that they can
sit beside tritonclient's `inference.*` in one process; only the service's full
name travels on the wire, and it is Triton's.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message

from moduleserve.client.pb import oip_v2_pb2 as pb

OIP_SERVICE = "inference.GRPCInferenceService"


def oip_methods() -> Iterator[tuple[str, type[Message], type[Message]]]:
    """(method name, request class, response class) for every OIP RPC."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        yield method.name, getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)


def method_path(name: str) -> str:
    """The HTTP/2 path of one OIP method, e.g. /inference.GRPCInferenceService/ModelInfer."""
    return f"/{OIP_SERVICE}/{name}"
