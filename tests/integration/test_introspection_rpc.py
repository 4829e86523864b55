"""Introspection over gRPC: a real server, a real registry (SQLite and PostgreSQL), real clients.

Every figure the server reports is compared with torch computed directly on the module
the test pushed. Every error is checked for its status code and sentence, followed by a
health Check proving the server still serves.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import InvalidArgumentError, ModuleServeError, NotFoundError
from moduleserve.client.inspect_cli import add_inspect_command
from moduleserve.client.introspection import IntrospectionClient
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.demo.models import MLP, FrozenBackboneNet, MyNet, Net, TiedAutoencoder
from moduleserve.server.app import App
from tests.helpers import (
    ServerThread,
    approx,
    assert_stats_match,
    expected_totals,
    randomize_batchnorm,
    server_settings,
)

IMAGE = "x:float32:-1,3,8,8"
VECTOR = "x:float32:-1,8"
# (registered class name, import path, kwargs, input spec)
CLASSES = [
    ("mynet", "moduleserve.registry.demo.models:MyNet", {}, IMAGE),
    ("net", "moduleserve.registry.demo.models:Net", {"channels": 4}, IMAGE),
    (
        "mlp",
        "moduleserve.registry.demo.models:MLP",
        {"in_features": 8, "hidden": [6, 5]},
        "x:float32:-1,8",
    ),
    (
        "mlp_wide",
        "moduleserve.registry.demo.models:MLP",
        {"in_features": 8, "hidden": [7, 5]},
        "x:float32:-1,8",
    ),
    ("frozen", "moduleserve.registry.demo.models:FrozenBackboneNet", {}, "x:float32:-1,16"),
    ("tied", "moduleserve.registry.demo.models:TiedAutoencoder", {}, VECTOR),
]


@dataclass
class Served:
    """A running server, clients on it, and the modules the test pushed (by model, version)."""

    app: App
    inspect: IntrospectionClient
    models: ModelClient
    health: health_pb2_grpc.HealthStub
    local: dict[tuple[str, int], nn.Module]

    def assert_serving(self) -> None:
        """The server answers health checks with SERVING."""
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def seed(registry: Registry) -> dict[tuple[str, int], nn.Module]:
    """Register the demo classes and push versions; return the modules pushed."""
    for name, path, kwargs, spec in CLASSES:
        registry.classes.register(name, path, kwargs, [parse_input_spec(spec)])
    mynet = MyNet()
    tuned = MyNet()
    tuned.load_state_dict(mynet.state_dict())
    with torch.no_grad():
        tuned.fc.weight.add_(0.01 * torch.randn_like(tuned.fc.weight))
        tuned.fc.bias[:3] = 0.0
    broken = MyNet()
    broken.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        broken.conv.bias[0], broken.conv.bias[1] = float("nan"), float("inf")
    net, mlp, wide = Net(channels=4), MLP(8, [6, 5]), MLP(8, [7, 5])
    randomize_batchnorm(net, 7)
    randomize_batchnorm(mlp, 3)
    pushes: list[tuple[str, str, nn.Module]] = [
        ("mynet", "mynet", mynet),
        ("mynet", "mynet", tuned),
        ("mynet", "mynet", broken),
        ("net", "net", net),
        ("mlp", "mlp", mlp),
        ("wide", "mlp_wide", wide),
        ("frozen", "frozen", FrozenBackboneNet()),
        ("tied", "tied", TiedAutoencoder()),
    ]
    local = {}
    for model, class_name, module in pushes:
        version = registry.push(model, module.state_dict(), class_name=class_name)
        local[(model, version.version)] = module.eval()
    registry.checkpoints.set_alias("mynet", "production", 1)
    return local


@pytest.fixture
def served(registry: Registry, db_url: str, store: Path) -> Iterator[Served]:
    """The seeded registry behind a running server (the Introspection service included)."""
    local = seed(registry)
    server = ServerThread(server_settings(db_url, store))
    try:
        with ModelClient(server.target) as models:
            inspect = IntrospectionClient(models.channel, timeout=30)
            yield Served(
                server.app, inspect, models, health_pb2_grpc.HealthStub(models.channel), local
            )
    finally:
        server.stop()


# -- expectations computed with torch directly -------------------------------------------------


def named_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Every parameter and buffer name (tied names included) → (kind, tensor)."""
    table = {n: ("parameter", p) for n, p in module.named_parameters(remove_duplicate=False)}
    table.update({n: ("buffer", b) for n, b in module.named_buffers(remove_duplicate=False)})
    return table


def tied_names(module: nn.Module) -> dict[str, set[str]]:
    """Name → the other names bound to the same Parameter object."""
    groups: dict[int, set[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {name: group - {name} for group in groups.values() for name in group}


def assert_listing_matches(served: Served, model: str, version: int, kind: str = "all") -> None:
    """ListTensors of a version agrees with the pushed module in every field and figure."""
    module = served.local[(model, version)]
    listing = served.inspect.tensors(model, str(version), kind=kind)  # type: ignore[arg-type]
    assert (listing.model.model, listing.model.version) == (model, version)
    expected = named_tensors(module)
    wanted = [n for n in module.state_dict() if kind == "all" or expected[n][0] + "s" == kind]
    assert [s.name for s in listing.tensors] == wanted
    ties = tied_names(module)
    for summary in listing.tensors:
        entry_kind, tensor = expected[summary.name]
        assert summary.kind == entry_kind
        assert summary.shape == tuple(tensor.shape)
        assert summary.dtype == str(tensor.dtype).removeprefix("torch.")
        assert summary.numel == tensor.numel()
        assert summary.requires_grad == (entry_kind == "parameter" and tensor.requires_grad)
        assert set(summary.tied_to) == ties.get(summary.name, set())
        assert_stats_match(summary.stats, tensor)
    assert listing.totals == expected_totals(module)


# -- module tree --------------------------------------------------------------------------------


def assert_tree_matches(served: Served, model: str) -> None:
    """GetModuleTree of version 1 agrees with the pushed module, node by node."""
    module = served.local[(model, 1)]
    tree = served.inspect.tree(model, "1")
    assert (tree.model.model, tree.model.version, tree.model.loaded) == (model, 1, False)
    expected = list(module.named_modules(remove_duplicate=False))
    assert [n.name for n in tree.nodes] == [name for name, _ in expected]
    for node, (name, sub) in zip(tree.nodes, expected, strict=True):
        params = list(sub.parameters())
        assert node.class_name == type(sub).__name__
        assert node.extra_repr == sub.extra_repr()
        assert node.depth == (name.count(".") + 1 if name else 0)
        assert node.parameters == sum(p.numel() for p in params)
        assert node.trainable == sum(p.numel() for p in params if p.requires_grad)
        assert node.frozen == sum(p.numel() for p in params if not p.requires_grad)
        assert node.own_parameters == sum(p.numel() for p in sub.parameters(recurse=False))
    assert tree.totals == expected_totals(module)
    lines = tree.text.splitlines()
    assert len(lines) == len(expected)
    assert lines[0].startswith(f"{type(module).__name__}(")
    assert f"params={expected_totals(module).parameters:,}" in lines[0]


def test_tree_matches_torch(served: Served) -> None:
    for model in ("mynet", "net", "mlp", "frozen", "tied"):
        assert_tree_matches(served, model)
    assert served.app.cache.loaded() == []  # a meta build: no weights read, nothing loaded


def test_tree_shows_nesting_and_frozen_counts(served: Served) -> None:
    by_name = {n.name: n for n in served.inspect.tree("net").nodes}
    assert by_name["block1.bn"].class_name == "BatchNorm2d"
    assert by_name["block1.bn"].depth == 2
    assert by_name["block1.bn"].extra_repr.startswith("4, eps=1e-05")
    frozen = served.inspect.tree("frozen")
    assert frozen.totals.frozen == 16 * 32 + 32
    assert frozen.totals.trainable == 32 * 4 + 4
    assert "frozen 544" in frozen.text.splitlines()[0]


# -- parameters and buffers -----------------------------------------------------------------------


def test_tensors_match_torch(served: Served) -> None:
    for model, version in served.local:
        assert_listing_matches(served, model, version)
    assert served.app.cache.loaded() == []  # statistics never load into the serving cache


def test_kinds_patterns_buffers_and_ties(served: Served) -> None:
    assert_listing_matches(served, "net", 1, kind="buffers")
    assert_listing_matches(served, "mlp", 1, kind="parameters")
    buffers = served.inspect.tensors("mlp", kind="buffers", pattern="*num_batches_tracked")
    assert [(s.name, s.dtype, s.shape) for s in buffers.tensors] == [
        ("layers.1.num_batches_tracked", "int64", ()),
        ("layers.5.num_batches_tracked", "int64", ()),
    ]
    stats = buffers.tensors[0].stats
    assert stats is not None and (stats.mean, stats.min, stats.std) == (3.0, 3.0, None)
    picked = served.inspect.tensors("net", pattern="block1.bn.*")
    assert [s.name for s in picked.tensors] == [
        "block1.bn.weight",
        "block1.bn.bias",
        "block1.bn.running_mean",
        "block1.bn.running_var",
        "block1.bn.num_batches_tracked",
    ]
    assert picked.totals == expected_totals(served.local[("net", 1)])  # totals ignore the glob
    assert served.inspect.tensors("net", pattern="nothing.*").tensors == ()
    tied = {s.name: s for s in served.inspect.tensors("tied").tensors}
    assert tied["decoder.weight"].tied_to == ("encoder.weight",)
    assert tied["encoder.weight"].tied_to == ("decoder.weight",)
    frozen = {s.name: s.requires_grad for s in served.inspect.tensors("frozen").tensors}
    assert frozen == {
        "backbone.0.weight": False,
        "backbone.0.bias": False,
        "head.weight": True,
        "head.bias": True,
    }


# -- tensor values ------------------------------------------------------------------------------


def test_tensor_values(served: Served) -> None:
    net = served.local[("net", 1)]
    got = served.inspect.tensor("net", "block1.bn.running_mean")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, net.block1.bn.running_mean.numpy())
    count = served.inspect.tensor("net", "block2.bn.num_batches_tracked", as_torch=True)
    assert count.dtype == torch.int64 and count.shape == () and int(count) == 7
    weight = served.local[("mynet", 1)].fc.weight
    part = served.inspect.tensor("mynet", "fc.weight", version="1", slices="0:2, :")
    np.testing.assert_array_equal(part, weight[0:2, :].detach().numpy())
    same = served.inspect.tensor("mynet", "fc.weight", "production", slices=(slice(0, 2), ...))
    np.testing.assert_array_equal(same, part)
    column = served.inspect.tensor("mynet", "fc.weight", "1", slices="..., -1", as_torch=True)
    assert torch.equal(column, weight[..., -1].detach())
    strided = served.inspect.tensor("mynet", "conv.weight", "1", slices="::2, 1, 0:3:2, -1")
    np.testing.assert_array_equal(
        strided, served.local[("mynet", 1)].conv.weight[::2, 1, 0:3:2, -1].detach().numpy()
    )
    assert served.app.cache.loaded() == []


# -- version diffs --------------------------------------------------------------------------------


def test_diff_matches_torch(served: Served) -> None:
    base, other = served.local[("mynet", 1)].state_dict(), served.local[("mynet", 2)].state_dict()
    diff = served.inspect.diff("mynet", "production", "2")
    assert (str(diff.base), str(diff.other)) == ("mynet:1", "mynet:2")
    assert [e.name for e in diff.entries] == list(base)
    assert (diff.compared, diff.changed, diff.unchanged, diff.mismatched) == (4, 2, 2, 0)
    assert diff.only_base == diff.only_other == ()
    for entry in diff.entries:
        a, b = base[entry.name].double(), other[entry.name].double()
        metrics = entry.metrics
        assert metrics is not None
        assert entry.kind == "parameter"
        assert entry.changed == (not torch.equal(a, b))
        assert metrics.changed_elements == int((a != b).sum())
        assert metrics.norm_base == approx(float(a.norm()))
        assert metrics.diff_norm == approx(float((b - a).norm()))
        assert metrics.relative_change == approx(float((b - a).norm() / a.norm()))
        assert metrics.max_abs_diff == approx(float((b - a).abs().max()))
    nonfinite = {e.name: e for e in served.inspect.diff("mynet", "2", "3").entries}
    bias = nonfinite["conv.bias"].metrics
    assert bias is not None and (bias.changed_elements, bias.nonfinite_changed) == (2, 2)
    assert bias.diff_norm == 0.0  # no position is finite on both sides and different


def test_diff_buffers_and_shape_mismatch_across_models(served: Served) -> None:
    diff = served.inspect.diff("mlp", "1", "1", other_model="wide")
    by_name = {e.name: e for e in diff.entries}
    assert by_name["layers.1.running_mean"].kind == "buffer"
    assert by_name["layers.1.num_batches_tracked"].kind == "buffer"
    assert by_name["layers.0.weight"].shape_mismatch
    assert by_name["layers.0.weight"].metrics is None
    assert (by_name["layers.0.weight"].shape_base, by_name["layers.0.weight"].shape_other) == (
        (6, 8),
        (7, 8),
    )
    count = by_name["layers.1.num_batches_tracked"].metrics
    assert count is not None and count.changed_elements == 1
    assert count.max_abs_diff == 3.0  # 3 tracked batches against a fresh module's 0
    assert diff.mismatched == sum(e.metrics is None for e in diff.entries) > 0


# -- errors ---------------------------------------------------------------------------------------


# (label, IntrospectionClient method, args, keyword args, error type, part of the sentence)
ERROR_CASES: list[tuple[str, str, tuple[Any, ...], dict[str, Any], type, str]] = [
    ("unknown model", "tree", ("nope",), {}, NotFoundError, "model 'nope' not found"),
    ("unknown version", "tensors", ("mynet", "9"), {}, NotFoundError, "no version or alias '9'"),
    ("unknown alias", "tensor", ("mynet", "fc.bias", "gone"), {}, NotFoundError, "alias 'gone'"),
    ("no model", "tree", ("",), {}, InvalidArgumentError, "names no model"),
    (
        "unknown tensor",
        "tensor",
        ("net", "block1.bn.running_men"),
        {},
        NotFoundError,
        "did you mean 'block1.bn.running_mean'",
    ),
    ("empty glob", "tensors", ("net",), {"pattern": ""}, InvalidArgumentError, "is empty"),
    ("bad glob", "tensors", ("net",), {"pattern": "block[1.*"}, InvalidArgumentError, "unclosed"),
    (
        "slice out of range",
        "tensor",
        ("mynet", "fc.weight"),
        {"slices": "10, :"},
        InvalidArgumentError,
        "index 10 is out of range for dimension 0 of size 10",
    ),
    (
        "slice too deep",
        "tensor",
        ("mynet", "fc.bias"),
        {"slices": "0, 0"},
        InvalidArgumentError,
        "indexes 2 dimensions but the tensor has 1",
    ),
    (
        "slice not an index",
        "tensor",
        ("mynet", "fc.bias"),
        {"slices": "__import__('os')"},
        InvalidArgumentError,
        "is not an integer",
    ),
    (
        "over the cap",
        "tensor",
        ("mynet", "fc.weight"),
        {"max_elements": 100},
        InvalidArgumentError,
        "5,760 elements, over the cap of 100",
    ),
    ("diff unknown version", "diff", ("mynet", "1", "8"), {}, NotFoundError, "alias '8'"),
    (
        "diff across classes",
        "diff",
        ("mynet", "1", "1"),
        {"other_model": "net"},
        InvalidArgumentError,
        "cannot diff net:1 (moduleserve.registry.demo.models:Net) against mynet:1",
    ),
]


def test_errors_are_statuses_with_a_sentence_and_the_server_keeps_serving(served: Served) -> None:
    for label, method, args, kwargs, error, sentence in ERROR_CASES:
        with pytest.raises(error) as caught:
            getattr(served.inspect, method)(*args, **kwargs)
        assert sentence in caught.value.details, label
        assert "Traceback" not in caught.value.details, label
        served.assert_serving()


def test_raw_request_errors(served: Served) -> None:
    stub = pb_grpc.IntrospectionStub(served.models.channel)
    mynet = pb.ModelRef(model="mynet")
    negative = pb.GetTensorRequest(model=mynet, name="fc.bias", max_elements=-1)
    bad = [
        (stub.ListTensors, pb.ListTensorsRequest(model=mynet, kind=7), "unknown tensor kind 7"),
        (stub.GetTensor, pb.GetTensorRequest(model=mynet, name=""), "names no tensor"),
        (stub.GetTensor, negative, "max_elements must be 0 or more, not -1"),
        (stub.DiffVersions, pb.DiffVersionsRequest(other=mynet), "no model in 'base'"),
    ]
    for method, request, sentence in bad:
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sentence in caught.value.details()
        served.assert_serving()


# -- loaded versus unloaded -----------------------------------------------------------------------


def test_loaded_model_is_inspected_in_place(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    served.inspect.tensors("net")
    served.inspect.tensor("net", "head.bias")
    served.inspect.tree("net")
    assert served.app.cache.loaded() == []
    served.models.load("net")
    (loaded,) = served.app.cache.loaded()
    tree = served.inspect.tree("net")
    assert tree.model.loaded
    assert tree.totals == expected_totals(served.local[("net", 1)])
    listing = served.inspect.tensors("net", "1")
    assert listing.model.loaded
    assert_listing_matches(served, "net", 1)
    live = dict(loaded.module.named_buffers())["block1.bn.running_var"]
    got = served.inspect.tensor("net", "block1.bn.running_var", as_torch=True)
    assert torch.equal(got, live.cpu())
    assert run_cli(served, "inspect", "net", "tree") == 0
    assert capsys.readouterr().out.startswith("net:1 (net, loaded)\n")
    assert served.app.cache.loaded() == [loaded]  # nothing else was loaded or reloaded


# -- the `moduleserve inspect` command ----------------------------------------------------------


def run_cli(served: Served, *argv: str) -> int:
    """Parse as `moduleserve` would (its global options first) and call the handler."""
    parser = argparse.ArgumentParser(prog="moduleserve")
    parser.add_argument("--target")
    parser.add_argument("--token")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--debug", action="store_true")
    add_inspect_command(parser.add_subparsers(required=True))
    args = parser.parse_args(["--target", f"127.0.0.1:{served.app.port}", *argv])
    return int(args.func(args))


def test_cli_views(served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(served, "inspect", "net", "tree") == 0
    out = capsys.readouterr().out
    assert "net:1 (net)" in out and "    bn: BatchNorm2d(4, eps=1e-05" in out
    assert "parameters: " in out
    assert run_cli(served, "--json", "inspect", "frozen:1", "tree") == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["totals"]["frozen"] == 544 and tree["nodes"][0]["class_name"] == "FrozenBackboneNet"
    assert run_cli(served, "inspect", "net", "buffers", "--pattern", "block1.*") == 0
    out = capsys.readouterr().out
    assert "block1.bn.num_batches_tracked" in out and "block1.conv.weight" not in out
    assert run_cli(served, "inspect", "frozen", "params", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [t["requires_grad"] for t in listing["tensors"]] == [False, False, True, True]
    out_file = tmp_path / "w.npy"
    view = ["tensor", "fc.weight", "--slice", "0:2,:3", "--out", str(out_file)]
    assert run_cli(served, "inspect", "mynet:1", *view) == 0
    capsys.readouterr()
    expected = served.local[("mynet", 1)].fc.weight[0:2, :3].detach().numpy()
    np.testing.assert_array_equal(np.load(out_file), expected)
    assert run_cli(served, "--json", "inspect", "mynet:1", "tensor", "fc.bias") == 0
    values = json.loads(capsys.readouterr().out)
    assert values["shape"] == [10]
    np.testing.assert_allclose(values["values"], served.local[("mynet", 1)].fc.bias.detach())
    assert run_cli(served, "inspect", "mynet:production", "diff", "2") == 0
    out = capsys.readouterr().out
    assert "mynet:2 against mynet:1" in out and "4 compared: 2 changed, 2 unchanged" in out
    assert run_cli(served, "--json", "inspect", "mlp:1", "diff", "wide:1") == 0
    assert json.loads(capsys.readouterr().out)["mismatched"] > 0


def test_cli_errors_are_one_sentence(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(served, "inspect", "mynet", "tensor", "fc.weight", "--max-elements", "5") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: tensor 'fc.weight' selection has 5,760 elements")
    assert len(captured.err.strip().splitlines()) == 1
    assert run_cli(served, "inspect", "mynet:1", "diff", "net:1") == 1
    assert "different Module classes" in capsys.readouterr().err
    assert run_cli(served, "inspect", "ghost", "tree") == 1
    assert capsys.readouterr().err == "error: model 'ghost' not found\n"
    served.assert_serving()


def test_client_error_types_carry_the_code(served: Served) -> None:
    with pytest.raises(ModuleServeError) as caught:
        served.inspect.tensors("net", pattern=" ")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
