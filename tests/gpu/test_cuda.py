"""CUDA inference, half precision and pinned-memory transfers (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.registry.api import Registry
from tests.helpers import ServerThread, server_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def start(registry: Registry, **overrides: object) -> ServerThread:
    return ServerThread(
        server_settings(registry.settings.database_url(), registry.settings.store, **overrides)
    )


def local(registry: Registry, model: str, x: np.ndarray) -> np.ndarray:
    module = registry.load_module(model)
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("model", ["mynet", "nested", "mlp"])
def test_cuda_matches_cpu(demo_registry: Registry, model: str) -> None:
    server = start(demo_registry, device="auto")
    try:
        assert server.app.device.type == "cuda"
        shape = (8, 784) if model == "mlp" else (8, 3, 8, 8)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        with ModelClient(server.target) as client:
            got = client.infer(model, x)
        np.testing.assert_allclose(got, local(demo_registry, model, x), rtol=1e-3, atol=1e-4)
        loaded = server.app.cache.loaded()[0]
        assert next(loaded.module.parameters()).is_cuda
    finally:
        server.stop()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_close_and_returns_float32(demo_registry: Registry, dtype: str) -> None:
    server = start(demo_registry, device="cuda", dtype=dtype)
    try:
        x = np.random.default_rng(1).standard_normal((16, 784)).astype(np.float32)
        with ModelClient(server.target) as client:
            got = client.infer("mlp", x)
        assert got.dtype == np.float32
        expected = local(demo_registry, "mlp", x)
        tolerance = 2e-2 if dtype == "float16" else 6e-2
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
        module = server.app.cache.loaded()[0].module
        assert next(module.parameters()).dtype == getattr(torch, dtype)
    finally:
        server.stop()


def test_unload_frees_gpu_memory(demo_registry: Registry) -> None:
    server = start(demo_registry, device="cuda")
    try:
        with ModelClient(server.target) as client:
            before = torch.cuda.memory_allocated()
            client.load("mlp")
            assert torch.cuda.memory_allocated() > before
            client.unload("mlp")
            assert torch.cuda.memory_allocated() == before
    finally:
        server.stop()
