"""Class specs that could never serve are refused when registered or when weights are pushed,
and a mistake is fixable: `classes update` (checked against every stored version) and
`classes delete` (refused while a version uses the class). SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import MAX_ROW_ELEMENTS, parse_input_spec, parse_tensor_spec
from moduleserve.registry.entities import TensorSpec
from moduleserve.registry.errors import (
    ClassInUseError,
    ClassNotFoundError,
    ForwardCheckError,
    InvalidInputError,
    WriteConflictError,
)
from tests.helpers import Cli
from tests.models import Doubler, FirstRowOnly


def spec(text: str) -> TensorSpec:
    return parse_input_spec(text)


def register_doubler(registry: Registry, name: str = "D", inputs: str = "x:float32:-1,1") -> None:
    registry.classes.register(name, "tests.models:Doubler", {}, [spec(inputs)])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x:float32:2", "shape [2] must start with -1, the batch dimension"),
        ("x:float32:4,-1", "shape [4, -1] must start with -1"),
        ("x:float:-1,1", "unknown dtype 'float'; use one of bool, uint8"),
        ("x:long:-1,1", "unknown dtype 'long'"),
        ("x:complex64:-1,1", "unknown dtype 'complex64'"),
        ("x:float32:-1,0", "dimensions are -1 (any size) or from 1 to"),
        ("x:float32:-1,-2", "dimensions are -1 (any size) or from 1 to"),
        ("x:float32:-1,1,1,1,1,1,1,1,1", "shape has 9 dimensions, over 8"),
        (f"x:float32:-1,{MAX_ROW_ELEMENTS},2", f"more than {MAX_ROW_ELEMENTS} elements per row"),
        ("x:float32:-1,a", "shape '-1,a' is not comma-separated integers"),
        ("x:float32", "is not name:dtype:shape"),
    ],
)
def test_a_spec_no_request_could_use_is_refused_in_one_sentence(text: str, words: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        parse_input_spec(text)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_register_checks_specs_given_as_objects_too(registry: Registry) -> None:
    for bad, words in (
        (TensorSpec("x", "float32", (1,)), "must start with -1"),
        (TensorSpec("x", "float", (-1, 1)), "unknown dtype 'float'"),
        (TensorSpec("x", "float32", ()), "must start with -1"),
    ):
        with pytest.raises(InvalidInputError, match=words):
            registry.classes.register("D", "tests.models:Doubler", {}, [bad])
    with pytest.raises(InvalidInputError, match="input 'x' is given twice"):
        registry.classes.register(
            "Two", "moduleserve.registry.demo.models:TwoInputNet", {}, [spec("x:float32:-1,4")] * 2
        )
    assert registry.classes.list() == []


def test_an_output_without_a_row_per_input_row_is_refused_at_registration(
    registry: Registry,
) -> None:
    with pytest.raises(ForwardCheckError, match=r"output 0 of forward\(\) has shape \[2\]"):
        registry.classes.register("Sum", "tests.models:RowSum", {}, [spec("x:float32:-1,2")])
    assert registry.classes.list() == []


def test_named_outputs_are_checked_against_what_forward_returns(registry: Registry) -> None:
    named = registry.classes.register(
        "D", "tests.models:Doubler", {}, [spec("x:float32:-1,1")], "", [spec("y:float32:-1,1")]
    )
    assert [s.to_dict() for s in named.outputs] == [
        {"name": "y", "dtype": "float32", "shape": [-1, 1]}
    ]
    for outputs, words in (
        ([spec("y:float64:-1,1")], "forward\\(\\) returns float32:-1,1, not float64:-1,1"),
        ([spec("y:float32:-1,3")], "not float32:-1,3"),
        ([spec("y:float32:-1,1"), spec("z:float32:-1,1")], "returns 1 output"),
    ):
        with pytest.raises(InvalidInputError, match=words):
            registry.classes.register(
                "E", "tests.models:Doubler", {}, [spec("x:float32:-1,1")], "", outputs
            )


def test_a_push_whose_weights_cannot_serve_the_spec_is_refused_and_stores_nothing(
    registry: Registry,
) -> None:
    # float64 inputs for float32 weights: the meta-device check at registration passes.
    register_doubler(registry, "D64", "x:float64:-1,1")
    registry.classes.register("First", "tests.models:FirstRowOnly", {}, [spec("x:float32:-1,2")])

    with pytest.raises(ForwardCheckError) as wrong_dtype:
        registry.push("d", Doubler().state_dict(), class_name="D64")
    with pytest.raises(ForwardCheckError) as wrong_rows:
        registry.push("first", FirstRowOnly().state_dict(), class_name="First")

    assert str(wrong_dtype.value).startswith(
        "state_dict with class 'D64' (x:float64:-1,1) fails a forward pass on 2 rows of zeros: "
    )
    assert str(wrong_rows.value) == (
        "state_dict with class 'First' (x:float32:-1,2) returns output 'output0' of shape "
        "[1, 2] for 2 input rows: every output needs one row per input row"
    )
    assert registry.checkpoints.list_models() == []
    assert list(registry.blobs.digests()) == []


def test_a_file_push_names_the_file(registry: Registry, tmp_path: Path) -> None:
    register_doubler(registry, "D64", "x:float64:-1,1")
    path = tmp_path / "weights.pth"
    torch.save(Doubler().state_dict(), path)
    with pytest.raises(ForwardCheckError, match=r"^weights\.pth with class 'D64'"):
        registry.push_file("d", path, class_name="D64")


def test_a_spec_mistake_is_fixed_by_update_then_the_push_goes_through(
    registry: Registry,
) -> None:
    register_doubler(registry, "D", "x:float64:-1,1")
    with pytest.raises(ForwardCheckError):
        registry.push("d", Doubler().state_dict(), class_name="D")

    fixed = registry.update_class("D", inputs=[spec("x:float32:-1,1")], description="fixed")

    assert (fixed.inputs, fixed.description) == ((spec("x:float32:-1,1"),), "fixed")
    assert registry.classes.get("D") == fixed
    version = registry.push("d", Doubler().state_dict(), class_name="D")
    assert registry.build_version(version)(torch.tensor([[4.0]])).item() == 9.0


def test_an_update_is_checked_against_every_stored_version(registry: Registry) -> None:
    register_doubler(registry)
    registry.push("a", Doubler().state_dict(), class_name="D")
    registry.push("b", Doubler().state_dict(), class_name="D")
    before = registry.classes.get("D")

    with pytest.raises(ForwardCheckError) as refused:
        registry.update_class("D", inputs=[spec("x:float16:-1,1")])

    assert str(refused.value).startswith("version a:1 with class 'D' (x:float16:-1,1) fails")
    assert registry.classes.get("D") == before
    renamed = registry.update_class("D", outputs=[spec("y:float32:-1,1")])
    assert [s.name for s in renamed.outputs] == ["y"]
    # New inputs keep the output names while forward() returns as many outputs.
    widened = registry.update_class("D", inputs=[spec("x:float32:-1,-1")])
    assert [s.name for s in widened.outputs] == ["y"]
    assert widened.inputs == (spec("x:float32:-1,-1"),)


def test_a_class_in_use_is_not_deleted_and_an_unused_one_is(registry: Registry) -> None:
    register_doubler(registry)
    for _ in range(2):
        registry.push("d", Doubler().state_dict(), class_name="D")

    with pytest.raises(ClassInUseError) as refused:
        registry.classes.delete("D")

    assert str(refused.value) == (
        "module class 'D' is used by version(s) d:1, d:2; delete them first"
    )
    for number in (1, 2):
        registry.checkpoints.delete("d", number)
    assert registry.classes.delete("D").name == "D"
    with pytest.raises(ClassNotFoundError):
        registry.classes.get("D")
    # The model keeps its numbering and takes the class its next push names.
    register_doubler(registry, "D2")
    with pytest.raises(InvalidInputError, match=r"has no class .* must name a --class"):
        registry.push("d", Doubler().state_dict())
    assert registry.push("d", Doubler().state_dict(), class_name="D2").version == 3
    assert registry.checkpoints.get_model("d").class_name == "D2"


def test_updates_and_pushes_that_cross_are_refused_not_interleaved(registry: Registry) -> None:
    register_doubler(registry)
    checked_before = registry.classes.get("D")
    stored = registry.classes.versions_of("D")
    registry.push("d", Doubler().state_dict(), class_name="D")  # pushed meanwhile

    # An update that checked the versions before that push is not stored.
    revised = replace(checked_before, outputs=(spec("y:float32:-1,1"),))
    with pytest.raises(WriteConflictError, match="run it again"):
        registry.classes.save(revised, stored)
    # A push checked against a spec an update has changed since is not recorded.
    registry.update_class("D", outputs=[spec("y:float32:-1,1")])
    digest = registry.checkpoints.resolve("d").digest
    with pytest.raises(WriteConflictError, match="push again"):
        registry.checkpoints.add_version("d", digest, 1, "D", checked=checked_before)
    assert registry.checkpoints.get_model("d").versions == (1,)


def test_the_cli_registers_updates_and_deletes_in_one_sentence_each(
    registry: Registry, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cli = Cli(registry.settings.database_url(), registry.settings.store, capsys)
    cli.base += ["--allow-prefix", "tests.models"]
    register = ["classes", "register", "D", "tests.models:Doubler"]

    code, out, err = cli(*register, "--input", "x:float32:1")
    assert (code, out) == (1, "")
    assert err == (
        "error: input 'x': shape [1] must start with -1, the batch dimension "
        "(e.g. x:float32:-1,1)\n"
    )
    code, _, err = cli(*register, "--input", "x:float:-1,1")
    assert code == 1 and "unknown dtype 'float'" in err and len(err.splitlines()) == 1

    assert cli(*register, "--input", "x:float32:-1,1", "--output", "y:float32:-1,1")[0] == 0
    torch.save(Doubler().state_dict(), tmp_path / "d.pth")
    assert cli("push", "d", str(tmp_path / "d.pth"), "--class", "D")[0] == 0
    code, out, err = cli("classes", "update", "D", "--input", "x:float64:-1,1")
    assert code == 1 and err.startswith("error: version d:1 with class 'D' (x:float64:-1,1)")
    code, out, _ = cli("classes", "update", "D", "--description", "doubles")
    assert code == 0 and "1 version(s) checked" in out
    assert cli.json("classes", "show", "D")["description"] == "doubles"  # type: ignore[index]
    code, _, err = cli("classes", "update", "D")
    assert (code, err) == (
        1,
        "error: nothing to update: give --input, --output or --description\n",
    )
    code, _, err = cli("classes", "delete", "D")
    assert (code, err) == (
        1,
        "error: module class 'D' is used by version(s) d:1; delete them first\n",
    )
    assert cli("delete", "d:1")[0] == 0
    assert cli("classes", "delete", "D") == (0, "deleted class D\n", "")


def test_output_specs_parse_like_inputs() -> None:
    assert parse_tensor_spec("logits:float32:-1,10", "output") == TensorSpec(
        "logits", "float32", (-1, 10)
    )
    with pytest.raises(InvalidInputError, match=r"^output 'y': shape"):
        parse_tensor_spec("y:float32:10", "output")
