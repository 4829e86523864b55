"""The benchmarked models and their throwaway registry (``bench.serve``, ``bench.engine``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: its registered class and its single input."""

    name: str
    class_name: str
    import_path: str
    kwargs: dict[str, Any]
    input_spec: str  # name:dtype:shape with -1 for the batch dimension

    @property
    def sample_shape(self) -> list[int]:
        """The input shape of one sample, batch dimension 1."""
        return [1, *(int(d) for d in self.input_spec.split(":")[2].split(",")[1:])]


MODELS = {
    "mynet": BenchModel(
        "mynet", "MyNet", "moduleserve.registry.demo.models:MyNet", {}, "x:float32:-1,3,8,8"
    ),
    "mlp": BenchModel(
        "mlp",
        "MLPBig",
        "moduleserve.registry.demo.models:MLP",
        {"in_features": 784, "hidden": [1024, 1024], "out_features": 10, "dropout": 0.1},
        "x:float32:-1,784",
    ),
}


def build_registry(tmp: Path, models: list[BenchModel]) -> dict[str, Any]:
    """Register the classes, push one seeded version each; return name -> (output, module)."""
    import torch

    from moduleserve.registry.api import open_registry
    from moduleserve.registry.classes import parse_input_spec
    from moduleserve.registry.config import RegistrySettings

    settings = RegistrySettings(
        db=f"sqlite:///{tmp}/registry.db",
        store=tmp / "store",
        allowed_class_prefixes=["moduleserve.registry.demo"],
    )
    reg = open_registry(settings, migrate_schema=True)
    built: dict[str, Any] = {}
    try:
        for model in models:
            cls = reg.classes.register(
                model.class_name,
                model.import_path,
                model.kwargs,
                [parse_input_spec(model.input_spec)],
            )
            torch.manual_seed(0)
            skeleton = reg.classes.build(cls, device="cpu")
            version = reg.push(
                model.name, skeleton.state_dict(), class_name=cls.name, alias="production"
            )
            output = cls.outputs[0]
            built[model.name] = (output.name, list(output.shape), reg.build_version(version))
    finally:
        reg.close()
    return built


def infer_request(model: BenchModel) -> bytes:
    """One serialized single-sample ModelInferRequest with random float32 input."""
    import numpy as np

    from moduleserve.client.pb import oip_v2_pb2 as pb

    name = model.input_spec.split(":")[0]
    data = np.random.default_rng(0).standard_normal(model.sample_shape, dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype="FP32", shape=model.sample_shape
    )
    request = pb.ModelInferRequest(
        model_name=model.name, inputs=[tensor], raw_input_contents=[data.tobytes()]
    )
    return request.SerializeToString()
