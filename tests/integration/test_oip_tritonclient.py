"""Triton's own Python client (tritonclient.grpc) against a real server, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import TwoInputNet
from tests.helpers import ServerThread


@pytest.fixture
def client(served: ServerThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served.target)


def local_forward(registry: Registry, model: str, x: np.ndarray) -> np.ndarray:
    module = registry.load_module(model)
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def test_server_and_model_status(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "moduleserve" and "model_repository" in metadata.extensions
    assert not client.is_model_ready("mynet")  # lazily loaded: not yet
    client.load_model("mynet")
    assert client.is_model_ready("mynet") and client.is_model_ready("mynet", "1")


def test_model_metadata_and_config(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("mynet")
    assert metadata.versions == ["1"] and metadata.platform == "pytorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, 3, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("output0", "FP32", [-1, 10])
    ]
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [784])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output0", [10])]
    assert config.parameters["module_class"].string_value == "moduleserve.registry.demo.models:MLP"


def test_infer_raw_fp32(client: triton.InferenceServerClient, demo_registry: Registry) -> None:
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mynet", [tensor], model_version="1")
    np.testing.assert_allclose(
        result.as_numpy("output0"), local_forward(demo_registry, "mynet", x), rtol=1e-5, atol=1e-6
    )
    assert result.get_response().model_version == "1"


def test_infer_typed_contents(served: ServerThread) -> None:
    # tritonclient's high-level client always sends raw bytes; its own generated stub
    # sends typed contents, as other OIP clients do.
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="doubler")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    tensor.contents.fp32_contents.extend([4.0, 5.0])
    with grpc.insecure_channel(served.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert list(response.outputs[0].contents.fp32_contents) == [9.0, 11.0]
    assert list(response.outputs[0].shape) == [2, 1] and not response.raw_output_contents


def test_several_named_inputs_map_to_forward_parameters(
    served: ServerThread, demo_registry: Registry
) -> None:
    demo_registry.classes.register(
        "Two",
        "moduleserve.registry.demo.models:TwoInputNet",
        {},
        [parse_input_spec("a:float32:-1,4"), parse_input_spec("b:float32:-1,4")],
    )
    module = TwoInputNet()
    demo_registry.push("two", module.state_dict(), class_name="Two")
    a, b = np.ones((2, 4), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = []
    # Sent in the opposite order to forward(a, b): names decide, not positions.
    for name, value in (("b", b), ("a", a)):
        tensor = triton.InferInput(name, [2, 4], "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = triton.InferenceServerClient(served.target).infer("two", inputs)
    expected = module(torch.from_numpy(a), torch.from_numpy(b)).detach().numpy()
    np.testing.assert_allclose(result.as_numpy("output0"), expected, rtol=1e-6)


def test_requested_outputs(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0]], np.float32))
    result = client.infer("doubler", [tensor], outputs=[triton.InferRequestedOutput("output0")])
    assert result.as_numpy("output0").tolist() == [[3.0]]


def test_repository_index_load_unload_and_statistics(
    client: triton.InferenceServerClient,
) -> None:
    index = {
        (m["name"], m["version"]): m["state"]
        for m in client.get_model_repository_index(as_json=True)["models"]
    }
    assert index == {
        ("doubler", "1"): "UNAVAILABLE",
        ("mlp", "1"): "UNAVAILABLE",
        ("mynet", "1"): "UNAVAILABLE",
        ("nested", "1"): "UNAVAILABLE",
    }
    client.load_model("doubler")
    ready = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m.get("state")) for m in ready if m.get("state") == "READY"} == {
        ("doubler", "READY")
    }
    tensor = triton.InferInput("x", [2, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0], [2.0]], np.float32))
    client.infer("doubler", [tensor])
    stats = client.get_inference_statistics("doubler", as_json=True)["model_stats"][0]
    assert stats["name"] == "doubler" and stats["version"] == "1"
    assert int(stats["inference_count"]) == 2 and int(stats["execution_count"]) == 1
    assert int(stats["inference_stats"]["success"]["count"]) == 1
    assert stats["batch_stats"][0]["batch_size"] == "2"
    client.unload_model("doubler")
    assert not client.is_model_ready("doubler")


def test_tritonclient_and_our_client_share_one_process() -> None:
    from tritonclient.grpc import service_pb2 as theirs

    import moduleserve.client.pb.oip_v2_pb2 as ours

    assert ours.ModelInferRequest.DESCRIPTOR.full_name == "moduleserve.oip.v2.ModelInferRequest"
    assert theirs.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    # The same bytes mean the same thing to both: only the service name is on the wire.
    request = ours.ModelInferRequest(model_name="m", model_version="2")
    parsed = theirs.ModelInferRequest.FromString(request.SerializeToString())
    assert (parsed.model_name, parsed.model_version) == ("m", "2")
