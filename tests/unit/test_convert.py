"""OIP tensor conversion: every datatype both ways, and every malformation with its sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.convert import (
    DATATYPES,
    check_input,
    datatype_of,
    has_typed_contents,
    inputs_from_pb,
    outputs_to_pb,
    tensor_from_pb,
    tensor_to_pb,
    torch_dtype,
)
from moduleserve.server.errors import (
    ByteCountError,
    DtypeError,
    InvalidTensorError,
    ShapeMismatchError,
)

# server.convert silences this in production; pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

NUMERIC = [name for name, row in DATATYPES.items() if row.torch is not None]
TYPED = [name for name in NUMERIC if DATATYPES[name].field is not None]
# (2, 3) decodes through the small-buffer copy, (4, 16) through the zero-copy view.
SHAPES = [(2, 3), (4, 16)]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Seeded values that exercise each dtype's range, extremes included."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(datatype)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    # int64 draws then a cast: torch.randint has no unsigned 64-bit kernel.
    info = np.iinfo(DATATYPES[datatype].numpy)
    high = min(int(info.max), 2**62)
    values = torch.randint(int(max(info.min, -(2**62))), high, shape, generator=gen)
    flat = values.flatten()
    flat[0], flat[-1] = int(info.min), min(int(info.max), 2**63 - 1)
    return flat.reshape(shape).to(dtype)


def as_input(out: pb.ModelInferResponse.InferOutputTensor) -> pb.ModelInferRequest.InferInputTensor:
    """Turn an encoded output into the request tensor a client would send back."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=out.name, datatype=out.datatype, shape=out.shape
    )
    tensor.contents.CopyFrom(out.contents)
    return tensor


def raw_input(name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    """A request tensor with no typed contents."""
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    original = sample(datatype, shape)
    out, data = tensor_to_pb("x", original, raw=True)
    assert (out.datatype, list(out.shape)) == (datatype, list(shape))
    assert data is not None and len(data) == original.numel() * original.element_size()
    decoded = tensor_from_pb(as_input(out), data)
    assert decoded.dtype == original.dtype
    assert torch.equal(decoded, original)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_round_trip(datatype: str) -> None:
    original = sample(datatype, (3, 5), seed=1)
    out, data = tensor_to_pb("x", original, raw=False)
    assert data is None
    assert len(getattr(out.contents, DATATYPES[datatype].field)) == 15
    decoded = tensor_from_pb(as_input(out), None)
    assert decoded.dtype == original.dtype
    assert torch.equal(decoded, original)


def test_bf16_raw_bytes_are_exact() -> None:
    # bfloat16 1.0 is 0x3F80 and -2.5 is 0xC020, little-endian on the wire.
    original = torch.tensor([[1.0, -2.5]], dtype=torch.bfloat16)
    out, data = tensor_to_pb("y", original, raw=True)
    assert (out.datatype, data) == ("BF16", b"\x80\x3f\x20\xc0")
    decoded = tensor_from_pb(raw_input("y", "BF16", [1, 2]), data)
    assert decoded.dtype is torch.bfloat16
    assert decoded.tolist() == [[1.0, -2.5]]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_types_have_no_typed_contents(datatype: str) -> None:
    tensor = raw_input("x", datatype, [2])
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, None)
    assert str(err.value) == (
        f"input 'x': datatype {datatype} has no typed contents field; send it in raw_input_contents"
    )
    assert not has_typed_contents(torch_dtype(datatype))
    with pytest.raises(ValueError, match="can only be sent raw"):
        tensor_to_pb("y", torch.zeros(2, dtype=torch_dtype(datatype)), raw=False)


def test_raw_input_is_a_zero_copy_view() -> None:
    data = np.arange(32, dtype=np.float32).tobytes()
    decoded = tensor_from_pb(raw_input("x", "FP32", [4, 8]), data)
    assert decoded.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert decoded[3, 7].item() == 31.0


def test_empty_tensor_decodes() -> None:
    decoded = tensor_from_pb(raw_input("x", "FP32", [0, 3]), b"")
    assert decoded.shape == (0, 3) and decoded.dtype is torch.float32


def test_non_contiguous_output_is_encoded_in_row_major_order() -> None:
    original = torch.arange(6, dtype=torch.int32).reshape(2, 3).t()
    _, data = tensor_to_pb("y", original, raw=True)
    assert np.frombuffer(data, dtype=np.int32).tolist() == [0, 3, 1, 4, 2, 5]


def test_byte_count_error_names_expected_and_received() -> None:
    with pytest.raises(ByteCountError) as err:
        tensor_from_pb(raw_input("x", "FP32", [2, 3]), bytes(20))
    assert str(err.value) == "input 'x': expected 24 bytes of FP32 data for shape [2, 3], got 20"
    assert (err.value.tensor, err.value.expected, err.value.received) == ("x", 24, 20)


def test_byte_count_error_for_too_many_bytes() -> None:
    with pytest.raises(ByteCountError) as err:
        tensor_from_pb(raw_input("img", "UINT8", [1, 3, 8, 8]), bytes(193))
    assert str(err.value) == (
        "input 'img': expected 192 bytes of UINT8 data for shape [1, 3, 8, 8], got 193"
    )


def test_bytes_datatype_is_refused() -> None:
    tensor = raw_input("x", "BYTES", [1])
    tensor.contents.bytes_contents.append(b"hello")
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, None)
    assert str(err.value) == "input 'x': datatype BYTES is not supported by this model"


def test_unknown_datatype_is_refused() -> None:
    with pytest.raises(InvalidTensorError, match=r"^input 'x': unknown datatype 'FLOAT32'; "):
        tensor_from_pb(raw_input("x", "FLOAT32", [1]), bytes(4))


def test_negative_dimension_is_refused() -> None:
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(raw_input("x", "FP32", [-1, 3]), bytes(12))
    assert str(err.value) == "input 'x': shape [-1, 3] has a negative dimension"


def test_typed_element_count_must_match_shape() -> None:
    tensor = raw_input("x", "FP32", [2, 3])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, None)
    assert str(err.value) == "input 'x': expected 6 FP32 values for shape [2, 3], got 5"


def test_typed_contents_in_the_wrong_field() -> None:
    tensor = raw_input("x", "FP32", [2])
    tensor.contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, None)
    assert (
        str(err.value)
        == "input 'x': datatype FP32 takes its values in fp32_contents, got int_contents"
    )


def test_raw_and_typed_together_are_refused() -> None:
    tensor = raw_input("x", "FP32", [1])
    tensor.contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, bytes(4))
    assert str(err.value) == "input 'x': has both typed contents and raw_input_contents; send one"


def test_typed_value_out_of_range() -> None:
    tensor = raw_input("x", "INT8", [2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidTensorError) as err:
        tensor_from_pb(tensor, None)
    assert str(err.value) == "input 'x': a value is out of range for INT8 (-128 to 127)"


def test_bool_raw_bytes_must_be_zero_or_one() -> None:
    with pytest.raises(InvalidTensorError, match="BOOL raw bytes must each be 0 or 1"):
        tensor_from_pb(raw_input("x", "BOOL", [3]), b"\x00\x01\x02")


def test_inputs_from_pb_pairs_raw_contents_by_position() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="INT32", shape=[1, 2])
    request.inputs.add(name="b", datatype="FP64", shape=[1])
    request.raw_input_contents.extend(
        [np.array([7, 8], np.int32).tobytes(), np.array([0.5]).tobytes()]
    )
    tensors = inputs_from_pb(request)
    assert list(tensors) == ["a", "b"]
    assert tensors["a"].tolist() == [[7, 8]] and tensors["b"].tolist() == [0.5]


def test_inputs_from_pb_needs_one_raw_entry_per_input() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="INT32", shape=[1])
    request.inputs.add(name="b", datatype="INT32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidInputError) as err:
        inputs_from_pb(request)
    assert str(err.value) == (
        "raw_input_contents has 1 entries for 2 inputs; send one per input, or none"
    )


def test_inputs_from_pb_refuses_duplicate_names() -> None:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        request.inputs.add(name="a", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    with pytest.raises(InvalidTensorError, match=r"^input 'a': appears more than once"):
        inputs_from_pb(request)


@pytest.mark.parametrize("raw", [True, False])
def test_outputs_to_pb_is_all_raw_or_all_typed(raw: bool) -> None:
    response = pb.ModelInferResponse(model_name="m")
    outputs = {"y": torch.tensor([[9.0]]), "idx": torch.tensor([3])}
    outputs_to_pb(response, outputs, raw=raw)
    assert [o.name for o in response.outputs] == ["y", "idx"]
    assert len(response.raw_output_contents) == (2 if raw else 0)
    assert all(o.HasField("contents") != raw for o in response.outputs)


def test_responses_decode_in_tritonclient() -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2

    response = pb.ModelInferResponse(model_name="m", id="7")
    outputs = {"y": sample("FP32", (2, 3)), "mask": sample("BOOL", (2,)), "h": sample("FP16", (4,))}
    outputs_to_pb(response, outputs, raw=True)
    result = grpcclient.InferResult(
        service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    )
    for name, tensor in outputs.items():
        np.testing.assert_array_equal(result.as_numpy(name), tensor.numpy())


def test_check_input_accepts_free_dimensions() -> None:
    check_input("x", torch.zeros(2, 3, 8, 8), "FP32", [-1, 3, 8, 8])
    check_input("x", torch.zeros(5, 3, 8, 8), torch.float32, (-1, 3, -1, 8))
    check_input("x", torch.zeros(1, 4), "float32", [-1, 4])


def test_check_input_shape_mismatch_sentence() -> None:
    with pytest.raises(ShapeMismatchError) as err:
        check_input("x", torch.zeros(2, 3, 8), "FP32", [-1, 3, 8, 8])
    assert str(err.value) == "input 'x': expected shape [-1, 3, 8, 8], got [2, 3, 8]"
    assert (err.value.expected, err.value.received) == ((-1, 3, 8, 8), (2, 3, 8))
    with pytest.raises(ShapeMismatchError, match=r"expected shape \[-1, 4\], got \[2, 3\]"):
        check_input("x", torch.zeros(2, 3), "FP32", [-1, 4])


def test_check_input_dtype_mismatch_sentence() -> None:
    with pytest.raises(DtypeError) as err:
        check_input("x", torch.zeros(2, 4, dtype=torch.float64), "FP32", [-1, 4])
    assert str(err.value) == "input 'x': expected datatype FP32, got FP64"
    assert isinstance(err.value, InvalidTensorError)
    assert isinstance(err.value, InvalidInputError)  # the one family: INVALID_ARGUMENT


def test_dtype_names() -> None:
    assert [datatype_of(torch_dtype(name)) for name in NUMERIC] == NUMERIC
    assert torch_dtype("torch.bfloat16") is torch.bfloat16
    assert torch_dtype("int64") is torch.int64
    with pytest.raises(ValueError, match="unknown tensor datatype 'BYTES'"):
        torch_dtype("BYTES")
    with pytest.raises(ValueError, match="complex64"):
        datatype_of(torch.complex64)
