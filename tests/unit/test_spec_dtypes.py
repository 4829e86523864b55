"""The dtypes a class spec may name are exactly the torch dtypes the wire can carry."""

from __future__ import annotations

from moduleserve.registry.classes import SPEC_DTYPES
from moduleserve.registry.formats import dtype_name, parse_dtype
from moduleserve.server.convert import DATATYPES, datatype_of


def test_spec_dtypes_are_the_open_inference_protocols() -> None:
    wire = {dtype_name(row.torch) for row in DATATYPES.values() if row.torch is not None}
    assert set(SPEC_DTYPES) == wire
    assert len(SPEC_DTYPES) == len(wire)
    for name in SPEC_DTYPES:  # each names its own canonical torch dtype (no aliases)
        assert dtype_name(parse_dtype(name)) == name
        assert datatype_of(parse_dtype(name))
