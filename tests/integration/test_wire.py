"""Wire details: reflection, the client's tensor kinds, OIP request parameters."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import DeadlineExceededError, InvalidArgumentError
from moduleserve.client.oip import method_path
from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests.helpers import ServerThread, server_settings
from tests.models import SlowNet


def test_reflection_lists_every_service_under_its_names(served: ServerThread) -> None:
    with grpc.insecure_channel(served.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {
            "inference.GRPCInferenceService",
            "moduleserve.oip.v2.GRPCInferenceService",
            "moduleserve.v1.Introspection",
            "grpc.health.v1.Health",
        } <= services
        # The name reflection describes is callable too, with the same methods.
        ready = channel.unary_unary(
            "/moduleserve.oip.v2.GRPCInferenceService/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        assert ready(pb.ServerReadyRequest()).ready


def test_client_returns_the_kind_and_batching_it_was_given(served: ServerThread) -> None:
    with ModelClient(served.target) as client:
        batch = client.infer("doubler", torch.tensor([[1.0], [2.0]]))
        assert isinstance(batch, torch.Tensor) and batch.tolist() == [[3.0], [5.0]]
        single = client.infer("doubler", torch.tensor([4.0]))
        assert isinstance(single, torch.Tensor) and single.tolist() == [9.0]
        array = client.infer("doubler", np.array([[0.5]], np.float32))
        assert isinstance(array, np.ndarray) and array.tolist() == [[2.0]]
        with pytest.raises(ValueError, match="no OIP datatype"):
            client.infer("doubler", np.array([[1 + 2j]]))


def test_timeout_parameter_drops_a_request_queued_too_long(demo_registry: Registry) -> None:
    demo_registry.classes.register(
        "Slow", "tests.models:SlowNet", {"delay_s": 0.5}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("slow", SlowNet(0.5).state_dict(), class_name="Slow")
    server = ServerThread(
        server_settings(demo_registry.settings.database_url(), demo_registry.settings.store)
    )
    try:
        with ModelClient(server.target) as client:
            client.load("slow")
            blocker = pb.ModelInferRequest(model_name="slow")
            blocker.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            blocker.raw_input_contents.append(bytes(8))
            infer = client.channel.unary_unary(
                method_path("ModelInfer"),
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            first = infer.future(blocker)  # occupies the model for 0.5 s
            late = pb.ModelInferRequest()
            late.CopyFrom(blocker)
            late.parameters["timeout"].uint64_param = 50_000  # microseconds, as Triton sends it
            with pytest.raises(DeadlineExceededError, match="deadline passed"):
                client.call("ModelInfer", late)
            assert first.result(timeout=10).model_version == "1"
            bad = pb.ModelInferRequest()
            bad.CopyFrom(blocker)
            bad.parameters["priority"].string_param = "high"
            with pytest.raises(InvalidArgumentError, match="'priority' must be an integer"):
                client.call("ModelInfer", bad)
            ok = pb.ModelInferRequest()
            ok.CopyFrom(blocker)
            ok.parameters["priority"].uint64_param = 1
            ok.parameters["timeout"].double_param = 0.0  # not an integer: refused below
            with pytest.raises(InvalidArgumentError, match="'timeout' must be an integer"):
                client.call("ModelInfer", ok)
    finally:
        server.stop()
