"""Introspection results survive server → protobuf → client unchanged; raw tensors round-trip."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
import pytest
import torch
from google.protobuf.message import Message

from moduleserve.client import introspection as client_side
from moduleserve.client import introspection_results as results
from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.registry import introspect
from moduleserve.registry.demo.models import MLP, FrozenBackboneNet, Net, TiedAutoencoder
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server import convert_introspect as convert

VERSION = Version("net", 3, "net", "0" * 64, 1, None, "upload", "", {}, {}, datetime.now(UTC))


Msg = TypeVar("Msg", bound=Message)


def wire(message: Msg) -> Msg:
    """The message after serialization, as the other side would parse it."""
    return type(message).FromString(message.SerializeToString())


def test_tree_round_trip() -> None:
    module = FrozenBackboneNet()
    nodes, totals = introspect.module_tree(module), introspect.totals(module)
    reply = wire(convert.tree_to_pb(VERSION, True, nodes, totals, "text"))
    tree = results.ModuleTree(
        model=client_side.version_from_pb(reply.model),
        nodes=tuple(client_side.module_node_from_pb(n) for n in reply.nodes),
        totals=client_side.totals_from_pb(reply.totals),
        text=reply.text,
    )
    assert tree.model == results.ModelVersion("net", 3, "net", True)
    assert [n.to_dict() for n in tree.nodes] == [n.to_dict() for n in nodes]
    assert tree.totals.to_dict() == totals.to_dict()


@pytest.mark.parametrize("factory", [Net, MLP, TiedAutoencoder, FrozenBackboneNet])
def test_summaries_round_trip(factory: type[torch.nn.Module]) -> None:
    module = factory()
    with torch.no_grad():
        first = next(module.parameters())
        first.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 0.0])
    summaries = introspect.tensor_summaries(module)
    reply = wire(convert.tensors_to_pb(VERSION, False, summaries, introspect.totals(module)))
    got = [client_side.summary_from_pb(t) for t in reply.tensors]
    assert [g.to_dict() for g in got] == [s.to_dict() for s in summaries]


def test_missing_statistics_stay_none() -> None:
    empty = results.TensorSummary("w", "buffer", (0,), "float32", "cpu", 0, False, (), stats=None)
    single = results.TensorSummary(
        "n", "buffer", (), "int64", "cpu", 1, False, (), introspect.tensor_stats(torch.tensor(7))
    )
    assert client_side.summary_from_pb(wire(convert.summary_to_pb(empty))).stats is None
    stats = client_side.summary_from_pb(wire(convert.summary_to_pb(single))).stats
    assert stats is not None and (stats.mean, stats.std, stats.norm) == (7.0, None, 7.0)
    only_nan = introspect.tensor_stats(torch.tensor([float("nan")]))
    assert only_nan is not None
    message = wire(convert.stats_to_pb(only_nan))
    assert not message.HasField("mean") and not message.HasField("min")
    assert client_side.stats_from_pb(message).nan_count == 1


def test_diff_round_trip() -> None:
    a = MLP(8, [6]).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["layers.0.weight"] += 1.0
    b["layers.0.bias"].zero_()
    a["layers.0.bias"].zero_()  # base norm 0, no change: relative change 0
    b["layers.4.weight"] = torch.zeros(10, 7)  # shape mismatch
    del b["layers.4.bias"]
    kinds = introspect.tensor_kinds(MLP(8, [6]))
    diff = introspect.diff_state_dicts(a, b, kinds=kinds)
    reply = wire(convert.diff_to_pb(VERSION, VERSION, diff))
    got = client_side.diff_from_pb(reply)
    assert (got.compared, got.changed, got.unchanged, got.mismatched) == (
        diff.compared,
        diff.changed,
        diff.unchanged,
        diff.mismatched,
    )
    assert got.only_base == ("layers.4.bias",) and got.only_other == ()
    for mine, theirs in zip(got.entries, diff.entries, strict=True):
        assert mine.name == theirs.name and mine.kind == kinds[theirs.name]
        assert (mine.shape_base, mine.shape_other) == (theirs.shape_base, theirs.shape_other)
        assert mine.changed == theirs.changed
        if theirs.metrics is None:
            assert mine.metrics is None
            continue
        assert mine.metrics is not None
        assert mine.metrics.norm_base == theirs.metrics.norm_base
        assert mine.metrics.diff_norm == theirs.metrics.diff_norm
        assert mine.metrics.relative_change == theirs.metrics.relative_change
        assert mine.metrics.max_abs_diff == theirs.metrics.max_abs_diff


def test_undefined_relative_change_is_absent() -> None:
    diff = introspect.diff_state_dicts({"w": torch.zeros(3)}, {"w": torch.ones(3)})
    metrics = diff.entries[0].metrics
    assert metrics is not None
    message = wire(convert.metrics_to_pb(metrics))
    assert not message.HasField("relative_change")
    assert client_side.metrics_from_pb(message).relative_change is None


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(4, 3).t(),  # not contiguous
        torch.randn(2, 3, dtype=torch.float64)[:, 1:],
        torch.randn(5).half(),
        torch.arange(-3, 3, dtype=torch.int8),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.tensor([True, False, True]),
        torch.tensor(7),  # 0-dim
        torch.empty(0, 4),
        torch.randn(3, dtype=torch.complex64),
        torch.arange(4, dtype=torch.uint8),
    ],
    ids=lambda t: f"{t.dtype}{list(t.shape)}",
)
def test_tensor_bytes_round_trip(tensor: torch.Tensor) -> None:
    reply = wire(convert.tensor_to_pb(VERSION, False, "t", tensor))
    dtype, shape, data = reply.dtype, tuple(reply.shape), reply.data
    assert shape == tuple(tensor.shape)
    as_numpy = client_side.decode_tensor(dtype, shape, data)
    np.testing.assert_array_equal(as_numpy, tensor.numpy())
    assert as_numpy.dtype == tensor.numpy().dtype and as_numpy.flags.writeable
    as_torch = client_side.decode_tensor(dtype, shape, data, as_torch=True)
    assert as_torch.dtype == tensor.dtype and torch.equal(as_torch, tensor)


def test_bfloat16_widens_exactly_for_numpy() -> None:
    tensor = torch.randn(2, 5).bfloat16()
    reply = wire(convert.tensor_to_pb(VERSION, False, "t", tensor))
    args = (reply.dtype, tuple(reply.shape), reply.data)
    np.testing.assert_array_equal(client_side.decode_tensor(*args), tensor.float().numpy())
    assert torch.equal(client_side.decode_tensor(*args, as_torch=True), tensor)
    with pytest.raises(ValueError, match="no numpy equivalent"):
        client_side.decode_tensor("float8_e4m3fn", (1,), b"\x00")


def test_slices_as_text() -> None:
    fmt = client_side.format_slices
    assert fmt(None) == ""
    assert fmt("0:2, :") == "0:2, :"
    assert (
        fmt((slice(0, 2), 3, Ellipsis, slice(None), slice(None, None, 2))) == "0:2, 3, ..., :, ::2"
    )
    shape = (4, 5, 6, 7, 8)
    text = fmt((slice(1, None), np.int64(-1), Ellipsis, slice(None, 4, 2)))
    values = np.arange(np.prod(shape)).reshape(shape)  # the same selection, however written
    expected = values[slice(1, None), -1, ..., slice(None, 4, 2)]
    np.testing.assert_array_equal(values[introspect.parse_slices(text, shape)], expected)
    with pytest.raises(ValueError, match="cannot index"):
        fmt((1.5,))


def test_request_decoding() -> None:
    assert convert.ref_from_pb(pb.ModelRef(model="m", version=" 2 ")) == ("m", "2")
    with pytest.raises(InvalidInputError, match="names no model in 'base'"):
        convert.ref_from_pb(pb.ModelRef(version="2"), "base")
    assert convert.kind_filter_from_pb(pb.TENSOR_KIND_UNSPECIFIED) == "all"
    assert convert.kind_filter_from_pb(pb.TENSOR_KIND_BUFFER) == "buffers"
    with pytest.raises(InvalidInputError, match="unknown tensor kind 9"):
        convert.kind_filter_from_pb(9)


@pytest.mark.parametrize("pattern", ["*", "fc.*", "a[bc]d", "[]]", "[!]]x", "a]b", "[a][b]"])
def test_check_pattern_accepts_what_fnmatch_reads_as_a_glob(pattern: str) -> None:
    introspect.check_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [("", "is empty"), ("  ", "is empty"), ("a[b", "unclosed '[' at position 1"),
     ("[]", "unclosed"), ("[!]", "unclosed"), ("[a][b", "at position 3"), ("*" * 1025, "longer")],
)  # fmt: skip
def test_check_pattern_refuses(pattern: str, reason: str) -> None:
    with pytest.raises(introspect.InvalidPatternError, match=re.escape(reason)):
        introspect.check_pattern(pattern)


def test_tensor_kinds() -> None:
    kinds = introspect.tensor_kinds(Net(channels=2))
    assert kinds["block1.bn.weight"] == "parameter"
    assert kinds["block1.bn.num_batches_tracked"] == "buffer"
    assert list(kinds) == list(Net(channels=2).state_dict())
    assert introspect.tensor_kinds(TiedAutoencoder()) == {
        "encoder.weight": "parameter",
        "decoder.weight": "parameter",
    }
