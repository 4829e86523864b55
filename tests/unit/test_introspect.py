"""Unit tests for registry.introspect: every figure is checked against torch computed directly."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from moduleserve.client.inspect_render import format_tree
from moduleserve.client.introspection_results import DiffMetrics, TensorDiff, TensorStats
from moduleserve.registry.demo.models import MLP, FrozenBackboneNet, MyNet, Net, TiedAutoencoder
from moduleserve.registry.introspect import (
    InvalidPatternError,
    InvalidSliceError,
    TensorNotFoundError,
    TensorNotMaterializedError,
    TooLargeError,
    diff_state_dicts,
    module_tree,
    tensor_stats,
    tensor_summaries,
    tensor_values,
    totals,
)
from tests.helpers import assert_stats_match


def approx(value: float) -> object:
    """Float64 results agree with torch to rounding; abs covers values near zero."""
    return pytest.approx(value, rel=1e-10, abs=1e-12)


def stats_of(stats: TensorStats | None) -> TensorStats:
    """Narrow an optional result for the type checker, failing the test when it is None."""
    assert stats is not None
    return stats


def metrics_of(entry: TensorDiff) -> DiffMetrics:
    """Return the numeric part of a diff entry, failing the test when it is missing."""
    assert entry.metrics is not None
    return entry.metrics


def trained_net() -> Net:
    """A seeded Net after one training-mode forward, so BatchNorm buffers are not defaults."""
    torch.manual_seed(0)
    net = Net()
    net.train()
    net(torch.randn(4, 3, 8, 8))
    return net


# --- module tree -------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [MyNet, Net, MLP, FrozenBackboneNet, TiedAutoencoder])
def test_module_tree_counts_match_torch(factory: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory()
    nodes = module_tree(model)
    assert [n.name for n in nodes] == [name for name, _ in model.named_modules()]
    for node in nodes:
        mod = model.get_submodule(node.name)
        params = list(mod.parameters())  # torch already lists a tied parameter once
        assert node.class_name == type(mod).__name__
        assert node.extra_repr == mod.extra_repr()
        assert node.depth == (len(node.name.split(".")) if node.name else 0)
        assert node.parameters == sum(p.numel() for p in params)
        assert node.trainable == sum(p.numel() for p in params if p.requires_grad)
        assert node.frozen == sum(p.numel() for p in params if not p.requires_grad)
        assert node.own_parameters == sum(p.numel() for p in mod.parameters(recurse=False))


def test_module_tree_nested_net() -> None:
    nodes = {n.name: n for n in module_tree(Net())}
    assert nodes["block1.bn"].depth == 2
    assert nodes["block1.bn"].class_name == "BatchNorm2d"
    assert nodes["block2.conv"].parameters == 16 * 32 * 9 + 32
    assert nodes["block2"].parameters == 16 * 32 * 9 + 32 + 2 * 32
    assert nodes["block2"].own_parameters == 0
    assert nodes[""].parameters == 5514


def test_module_tree_frozen_backbone() -> None:
    nodes = {n.name: n for n in module_tree(FrozenBackboneNet())}
    assert (nodes[""].trainable, nodes[""].frozen) == (32 * 4 + 4, 16 * 32 + 32)
    assert (nodes["backbone"].trainable, nodes["backbone"].frozen) == (0, 544)
    assert (nodes["head"].trainable, nodes["head"].frozen) == (132, 0)


def test_module_tree_tied_counted_once() -> None:
    nodes = {n.name: n for n in module_tree(TiedAutoencoder(features=8))}
    assert nodes[""].parameters == 64  # not 128: decoder.weight is encoder.weight
    assert nodes["encoder"].parameters == nodes["decoder"].parameters == 64


def test_module_tree_on_meta_device_matches_cpu() -> None:
    with torch.device("meta"):
        meta = Net()
    assert next(meta.parameters()).is_meta
    assert module_tree(meta) == module_tree(Net())
    assert totals(meta) == totals(Net())


def test_format_tree_lines() -> None:
    torch.manual_seed(0)
    lines = format_tree(module_tree(MyNet())).splitlines()
    assert lines[0] == "MyNet()  params=6,218 (trainable 6,218)"
    assert lines[2] == (
        "  fc: Linear(in_features=576, out_features=10, bias=True)  params=5,770 (trainable 5,770)"
    )
    frozen = format_tree(module_tree(FrozenBackboneNet())).splitlines()
    assert frozen[1] == "  backbone: Sequential()  params=544 (trainable 0, frozen 544)"
    assert frozen[2].startswith("    0: Linear(in_features=16, out_features=32, bias=True)  ")


# --- totals ------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [MyNet, Net, MLP, FrozenBackboneNet, TiedAutoencoder])
def test_totals_match_torch(factory: type[nn.Module]) -> None:
    model = factory()
    params, buffers = list(model.parameters()), list(model.buffers())
    result = totals(model)
    assert result.parameters == sum(p.numel() for p in params)
    assert result.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert result.frozen == sum(p.numel() for p in params if not p.requires_grad)
    assert result.parameter_bytes == sum(p.numel() * p.element_size() for p in params)
    assert result.parameter_tensors == len(params)
    assert result.buffer_elements == sum(b.numel() for b in buffers)
    assert result.buffer_bytes == sum(b.numel() * b.element_size() for b in buffers)
    assert result.buffer_tensors == len(buffers)


def test_totals_tied_and_batchnorm() -> None:
    assert totals(TiedAutoencoder(features=8)).parameters == 64
    assert totals(TiedAutoencoder(features=8)).parameter_tensors == 1
    # Per BatchNorm2d: running_mean + running_var (float32) and num_batches_tracked (int64).
    net_totals = totals(Net(channels=16))
    assert net_totals.buffer_elements == (16 + 16 + 1) + (32 + 32 + 1)
    assert net_totals.buffer_bytes == (16 + 16 + 32 + 32) * 4 + 2 * 8


# --- tensor summaries --------------------------------------------------------------------


@pytest.mark.parametrize("factory", [MyNet, trained_net, MLP, FrozenBackboneNet, TiedAutoencoder])
def test_tensor_summaries_match_torch(factory: Callable[[], nn.Module]) -> None:
    torch.manual_seed(1)
    model = factory()
    state = model.state_dict(keep_vars=True)
    summaries = tensor_summaries(model, "all")
    assert [s.name for s in summaries] == list(state)
    params = dict(model.named_parameters(remove_duplicate=False))
    for summary in summaries:
        tensor = state[summary.name]
        assert summary.kind == ("parameter" if summary.name in params else "buffer")
        assert summary.shape == tuple(tensor.shape)
        assert summary.dtype == str(tensor.dtype).removeprefix("torch.")
        assert summary.device == "cpu"
        assert summary.numel == tensor.numel()
        assert summary.requires_grad == (summary.name in params and tensor.requires_grad)
        assert_stats_match(summary.stats, tensor)


def test_tensor_summaries_batchnorm_buffers() -> None:
    net = trained_net()
    by_name = {s.name: s for s in tensor_summaries(net, "buffers")}
    assert list(by_name) == [name for name, _ in net.named_buffers()]
    tracked = by_name["block1.bn.num_batches_tracked"]
    assert (tracked.dtype, tracked.shape, tracked.requires_grad) == ("int64", (), False)
    assert tracked.stats == TensorStats(1.0, None, 1.0, 1.0, 1.0, 0.0, 1, 0, 0)
    state = net.state_dict()
    running_mean = stats_of(by_name["block1.bn.running_mean"].stats).mean
    assert running_mean == approx(float(state["block1.bn.running_mean"].double().mean()))
    assert running_mean != 0.0  # the forward pass moved it off its initial zeros
    assert_stats_match(by_name["block2.bn.running_var"].stats, state["block2.bn.running_var"])


def test_tensor_summaries_kind_and_pattern() -> None:
    net = Net()
    params = tensor_summaries(net, "parameters")
    assert [s.name for s in params] == [name for name, _ in net.named_parameters()]
    assert all(s.kind == "parameter" and s.requires_grad for s in params)
    picked = [s.name for s in tensor_summaries(net, "all", pattern="block1.bn.*")]
    assert picked == [
        f"block1.bn.{n}"
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    assert [s.name for s in tensor_summaries(net, "parameters", "*.conv.bias")] == [
        "block1.conv.bias",
        "block2.conv.bias",
    ]
    assert tensor_summaries(net, "buffers", "head.*") == []
    with pytest.raises(InvalidPatternError, match="empty"):
        tensor_summaries(net, "all", "")
    with pytest.raises(ValueError, match="kind"):
        tensor_summaries(net, "weights")  # type: ignore[arg-type]


def test_tensor_summaries_frozen_requires_grad() -> None:
    by_name = {s.name: s for s in tensor_summaries(FrozenBackboneNet(), "parameters")}
    assert not by_name["backbone.0.weight"].requires_grad
    assert by_name["head.weight"].requires_grad


def test_tensor_summaries_tied() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder(features=8)
    encoder, decoder = tensor_summaries(model, "parameters")
    assert (encoder.name, encoder.tied_to) == ("encoder.weight", ("decoder.weight",))
    assert (decoder.name, decoder.tied_to) == ("decoder.weight", ("encoder.weight",))
    assert encoder.stats == decoder.stats
    assert_stats_match(encoder.stats, model.encoder.weight)
    # Filtering does not hide the tie.
    (only,) = tensor_summaries(model, "all", "decoder.*")
    assert only.tied_to == ("encoder.weight",)
    assert all(s.tied_to == () for s in tensor_summaries(MyNet()))


def test_shared_storage_counts_as_tied() -> None:
    # Two Parameter objects over one storage: torch's parameters() lists both, memory holds one.
    one, two = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    model = nn.Sequential(one, two)
    two.weight = nn.Parameter(one.weight.detach())
    assert sum(p.numel() for p in model.parameters()) == 32
    assert (totals(model).parameters, totals(model).parameter_bytes) == (16, 64)
    assert module_tree(model)[0].parameters == 16
    first, second = tensor_summaries(model, "parameters")
    assert (first.tied_to, second.tied_to) == (("1.weight",), ("0.weight",))
    # A view of part of the storage is not a tie: it does not hold the same elements.
    two.weight = nn.Parameter(one.weight.detach()[:2])
    assert totals(model).parameters == 16 + 8
    assert all(s.tied_to == () for s in tensor_summaries(model))


def test_tensor_summaries_meta_has_no_stats() -> None:
    with torch.device("meta"):
        net = Net()
    summaries = tensor_summaries(net)
    assert len(summaries) == len(net.state_dict())
    assert all(s.stats is None and s.device == "meta" for s in summaries)
    assert summaries[0].shape == (16, 3, 3, 3)


def test_summaries_serialize_to_json() -> None:
    summary = tensor_summaries(TiedAutoencoder(features=2))[0]
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["tied_to"] == ["decoder.weight"]
    assert data["shape"] == [2, 2]
    assert set(data["stats"]) >= {"mean", "std", "min", "max", "norm", "nan_count"}
    assert json.loads(json.dumps(module_tree(MyNet())[2].to_dict()))["parameters"] == 5770


# --- statistics --------------------------------------------------------------------------


def test_stats_nan_and_inf_are_counted_apart() -> None:
    torch.manual_seed(0)
    t = torch.randn(1000)
    t[20:30] = 0.0
    t[3], t[10], t[11] = math.nan, math.inf, -math.inf
    stats = stats_of(tensor_stats(t, chunk_elements=64))
    assert (stats.nan_count, stats.inf_count, stats.finite) == (1, 2, 997)
    assert stats.zero_fraction == 10 / 1000
    assert_stats_match(stats, t)
    all_nan = tensor_stats(torch.full((5,), math.nan))
    assert all_nan == TensorStats(None, None, None, None, None, 0.0, 0, 5, 0)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(37, 29) * 3 + 1e4,  # large offset: a naive sum of squares would lose it
        lambda: torch.randn(29, 37).t(),  # non-contiguous
        lambda: torch.randn(4, 50, 3)[:, ::3, 1:],  # strided views in several dimensions
        lambda: torch.randn(2, 3, 40, dtype=torch.float16),
        lambda: torch.randint(-5, 6, (13, 11)),
    ],
)
def test_stats_chunking_matches_direct(chunk: int, make: Callable[[], torch.Tensor]) -> None:
    torch.manual_seed(0)
    t = make()
    assert_stats_match(tensor_stats(t, chunk_elements=chunk), t)


def test_stats_float64_sum_overflow_is_not_taken_for_nonfinite() -> None:
    t = torch.tensor([1e308, 1e308, -1e308, 0.0], dtype=torch.float64)
    stats = stats_of(tensor_stats(t, chunk_elements=3))  # the first chunk's sum overflows
    assert (stats.finite, stats.nan_count, stats.inf_count) == (4, 0, 0)
    assert stats.mean == approx(1e308 / 4)
    assert (stats.min, stats.max, stats.zero_fraction) == (-1e308, 1e308, 0.25)


def test_stats_edge_cases() -> None:
    assert tensor_stats(torch.empty(0, 3)) is None
    assert tensor_stats(torch.zeros(2, dtype=torch.complex64)) is None
    assert tensor_stats(torch.tensor(2.5)) == TensorStats(2.5, None, 2.5, 2.5, 2.5, 0.0, 1, 0, 0)
    flags = torch.tensor([True, False, True, True])
    assert_stats_match(tensor_stats(flags), flags)
    assert stats_of(tensor_stats(flags)).mean == 0.75
    with pytest.raises(ValueError, match="chunk_elements"):
        tensor_stats(torch.ones(3), chunk_elements=0)


# --- tensor values -----------------------------------------------------------------------


def test_tensor_values_slices() -> None:
    torch.manual_seed(0)
    net = Net()
    weight = net.block1.conv.weight  # [16, 3, 3, 3]
    cases = {
        "0:2, :, 1": weight[0:2, :, 1],
        "-1": weight[-1],
        "::5, 0, 1:, 2": weight[::5, 0, 1:, 2],
        "..., 0": weight[..., 0],
        "1, ..., 0:2": weight[1, ..., 0:2],
        "0:100": weight[0:100],  # slices clamp, as in numpy
        "  ": weight,
    }
    for text, expected in cases.items():
        values = tensor_values(net, "block1.conv.weight", text, max_elements=10_000)
        assert torch.equal(values, expected.detach()), text
        assert values.is_contiguous() and values.device.type == "cpu"
        assert not values.requires_grad
    values = tensor_values(net, "block1.conv.weight", "0, 0, 0, 0")
    values.fill_(123.0)  # a copy: the model is untouched
    assert weight[0, 0, 0, 0] != 123.0


def test_tensor_values_buffers_mappings_and_ties() -> None:
    net = trained_net()
    tracked = tensor_values(net, "block2.bn.num_batches_tracked", None, 10)
    assert tracked.dtype == torch.int64 and int(tracked) == 1
    state = net.state_dict()
    assert torch.equal(tensor_values(state, "head.bias", "0:3"), state["head.bias"][:3])
    tied = TiedAutoencoder(features=4)
    assert torch.equal(tensor_values(tied, "decoder.weight"), tied.encoder.weight.detach())


def test_tensor_values_not_found_suggests() -> None:
    with pytest.raises(
        TensorNotFoundError, match=r"'fc\.weigth' not found; did you mean 'fc\.weight'"
    ):
        tensor_values(MyNet(), "fc.weigth", None, 10)
    with pytest.raises(LookupError, match="among 4 tensors"):
        tensor_values(MyNet(), "zzz", None, 10)
    with torch.device("meta"):
        meta = MyNet()
    with pytest.raises(TensorNotMaterializedError, match=r"'fc\.bias'"):
        tensor_values(meta, "fc.bias", None, 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:a", "'a' is not an integer"),
        ("1:2:3:4", "more than two colons"),
        ("0,,1", "dimension 1 is empty"),
        ("::0", "step 0"),
        ("::-1", "step -1"),
        ("0,0,0,0,0", "indexes 5 dimensions but the tensor has 4"),
        ("16", "index 16 is out of range for dimension 0 of size 16"),
        ("0, -4", "index -4 is out of range for dimension 1 of size 3"),
        ("..., 3", "index 3 is out of range for dimension 3 of size 3"),
        ("..., 0, ...", "only once"),
        ("__import__('os')", "not an integer"),
        ("1e3", "not an integer"),
    ],
)
def test_tensor_values_bad_slices(text: str, message: str) -> None:
    with pytest.raises(InvalidSliceError, match=message):
        tensor_values(Net(), "block1.conv.weight", text, 10_000)


def test_tensor_values_size_cap() -> None:
    model = MyNet()
    with pytest.raises(TooLargeError, match=r"5,760 elements, over the cap of 1,000; .*slice"):
        tensor_values(model, "fc.weight", None, 1000)
    assert tensor_values(model, "fc.weight", "0:1", 1000).shape == (1, 576)
    with pytest.raises(TooLargeError, match="1,152 elements"):
        tensor_values(model, "fc.weight", "0:2", 1000)


# --- state dict diffs --------------------------------------------------------------------


def test_diff_model_against_perturbed_copy() -> None:
    net = trained_net()
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    b["head.weight"] += 0.01 * torch.randn_like(b["head.weight"])
    b["block1.conv.bias"][3] += 1.0
    b["block2.bn.num_batches_tracked"] += 4
    b["block2.conv.bias"] = torch.zeros(5)  # shape mismatch
    b["block1.bn.running_var"] = b["block1.bn.running_var"].double()  # dtype mismatch
    del b["head.bias"]
    b["extra.weight"] = torch.ones(2)

    diff = diff_state_dicts(a, b, chunk_elements=7)
    entries = {e.name: e for e in diff.entries}
    numeric_changed = {"head.weight", "block1.conv.bias", "block2.bn.num_batches_tracked"}
    mismatched = {"block2.conv.bias", "block1.bn.running_var"}
    assert {n for n, e in entries.items() if e.changed} == numeric_changed | mismatched
    assert (diff.only_base, diff.only_other) == (("head.bias",), ("extra.weight",))
    assert (diff.compared, diff.changed, diff.unchanged) == (len(a) - 1, 5, len(a) - 6)
    assert diff.mismatched == 2
    assert (
        entries["block2.conv.bias"].shape_mismatch and entries["block2.conv.bias"].metrics is None
    )
    assert entries["block1.bn.running_var"].dtype_mismatch
    assert entries["block1.bn.running_var"].dtype_other == "float64"
    for name, entry in entries.items():
        if name in mismatched:
            continue
        ta, tb = a[name].double(), b[name].double()
        m = metrics_of(entry)
        assert m.changed_elements == int((a[name] != b[name]).sum())
        assert m.nonfinite_changed == 0
        assert m.norm_base == approx(float(ta.norm()))
        assert m.diff_norm == approx(float((tb - ta).norm()))
        assert m.max_abs_diff == approx(float((tb - ta).abs().max()))
        if float(ta.norm()) > 0:
            assert m.relative_change == approx(float((tb - ta).norm() / ta.norm()))
    assert metrics_of(entries["block1.conv.bias"]).changed_elements == 1
    assert metrics_of(entries["block1.conv.bias"]).max_abs_diff == pytest.approx(1.0, abs=1e-6)
    assert metrics_of(entries["block2.bn.num_batches_tracked"]).relative_change == approx(4.0)
    assert json.loads(json.dumps(diff.to_dict()))["only_other"] == ["extra.weight"]


def test_diff_chunking_and_identity() -> None:
    torch.manual_seed(0)
    a = {"w": torch.randn(33, 17), "t": torch.randn(17, 33).t()}
    b = {k: v + 0.5 * torch.randn_like(v) for k, v in a.items()}
    for small, whole in zip(
        diff_state_dicts(a, b, chunk_elements=5).entries,
        diff_state_dicts(a, b).entries,
        strict=True,
    ):
        assert metrics_of(small).changed_elements == metrics_of(whole).changed_elements == 33 * 17
        for field in ("norm_base", "diff_norm", "relative_change", "max_abs_diff"):
            assert getattr(metrics_of(small), field) == approx(getattr(metrics_of(whole), field))
        ta, tb = a[small.name].double(), b[small.name].double()
        assert metrics_of(small).diff_norm == approx(float((tb - ta).norm()))
    same = diff_state_dicts(a, {k: v.clone() for k, v in a.items()})
    assert (same.changed, same.unchanged) == (0, 2)
    assert all(metrics_of(e).diff_norm == 0.0 for e in same.entries)


def test_diff_zero_norm_and_nonfinite() -> None:
    zeros = {"z": torch.zeros(3)}
    assert metrics_of(diff_state_dicts(zeros, zeros).entries[0]).relative_change == 0.0
    grown = metrics_of(diff_state_dicts(zeros, {"z": torch.tensor([0.0, 3.0, 4.0])}).entries[0])
    assert (grown.relative_change, grown.diff_norm, grown.norm_base) == (None, 5.0, 0.0)
    nan = math.nan
    a = {"x": torch.tensor([nan, 1.0, 2.0, 5.0])}
    b = {"x": torch.tensor([nan, 1.0, math.inf, 7.0])}
    m = metrics_of(diff_state_dicts(a, b).entries[0])
    assert (m.changed_elements, m.nonfinite_changed, m.diff_norm, m.max_abs_diff) == (
        2,
        1,
        2.0,
        2.0,
    )
    assert m.norm_base == approx(math.sqrt(1 + 4 + 25))
    big = diff_state_dicts({"n": torch.tensor([2**60])}, {"n": torch.tensor([2**60 + 1])})
    assert big.entries[0].changed  # exact compare, though float64 cannot tell them apart
