"""The Module class catalog: import paths checked against allowed prefixes, specs, building."""

from __future__ import annotations

import builtins
import importlib
import inspect
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from moduleserve.registry.db import Database
from moduleserve.registry.entities import ModuleClass, TensorSpec
from moduleserve.registry.errors import (
    AlreadyExistsError,
    ClassBuildError,
    ClassInUseError,
    ClassNotAllowedError,
    ClassNotFoundError,
    ForwardCheckError,
    InvalidInputError,
    WriteConflictError,
    shorten,
)
from moduleserve.registry.names import check_name
from moduleserve.registry.orm import ModelRow, ModuleClassRow, VersionRow

# torch is imported by the functions that build or check a class, not here: reading the
# catalog (`classes list`, `show`) then does not pay torch's 1-2 s import.
if TYPE_CHECKING:
    import torch
    from torch import nn


# The dtypes a spec may name: the torch names of the Open Inference Protocol's datatypes
# (server/convert.py DATATYPES; a unit test keeps the two in step). Aliases such as `float`
# or `long` are refused, so that a stored spec has one spelling.
SPEC_DTYPES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
)
MAX_SPEC_DIMS = 8
MAX_SPEC_DIM = 2**31 - 1
MAX_ROW_ELEMENTS = 2**26
"""Elements of one row (the fixed dimensions after the batch one multiplied): 256 MiB of
float32, and the checks below run two such rows."""
CHECK_ROWS = 2
"""Rows of zeros the checks feed a class: each output must come back with this many."""


def parse_input_spec(text: str) -> TensorSpec:
    """Parse `name:dtype:shape`, e.g. `x:float32:-1,3,8,8` (-1 first: the batch dimension)."""
    return parse_tensor_spec(text, "input")


def parse_tensor_spec(text: str, kind: str) -> TensorSpec:
    """Parse an input's or output's `name:dtype:shape` and check it (`check_spec`)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidInputError(
            f"{kind} spec {shorten(text)!r} is not name:dtype:shape (x:float32:-1,4)"
        )
    name, dtype, shape_text = parts
    try:
        shape = tuple(int(d) for d in shape_text.split(","))
    except ValueError:
        raise InvalidInputError(
            f"{kind} spec {shorten(text)!r}: shape {shorten(shape_text)!r} is not "
            "comma-separated integers such as -1,3,8,8"
        ) from None
    spec = TensorSpec(name, dtype, shape)
    check_spec(spec, kind)
    return spec


def check_spec(spec: TensorSpec, kind: str) -> None:
    """Refuse a spec no request could be served with: one sentence naming the problem."""
    label = f"{kind} {shorten(spec.name)!r}"
    if not spec.name.isidentifier() or len(spec.name) > 64:
        raise InvalidInputError(f"{label}: a name is a Python identifier of at most 64 characters")
    if spec.dtype not in SPEC_DTYPES:
        raise InvalidInputError(
            f"{label}: unknown dtype {shorten(spec.dtype)!r}; use one of {', '.join(SPEC_DTYPES)}"
        )
    shape = list(spec.shape)
    if not shape or shape[0] != -1:
        raise InvalidInputError(
            f"{label}: shape {shorten(shape)} must start with -1, the batch dimension "
            f"(e.g. {spec.name}:{spec.dtype}:-1,{','.join(str(d) for d in shape[:3]) or '4'})"
        )
    if len(shape) > MAX_SPEC_DIMS:
        raise InvalidInputError(f"{label}: shape has {len(shape)} dimensions, over {MAX_SPEC_DIMS}")
    if any(d == 0 or d < -1 or d > MAX_SPEC_DIM for d in shape):
        raise InvalidInputError(
            f"{label}: shape {shorten(shape)}: dimensions are -1 (any size) or from 1 to "
            f"{MAX_SPEC_DIM}"
        )
    if math.prod(d for d in shape[1:] if d > 0) > MAX_ROW_ELEMENTS:
        raise InvalidInputError(
            f"{label}: shape {shorten(shape)} holds more than {MAX_ROW_ELEMENTS} elements per row"
        )


def _check_specs(specs: Sequence[TensorSpec], kind: str) -> None:
    for spec in specs:
        check_spec(spec, kind)
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidInputError(f"{kind} {twice[0]!r} is given twice")


def check_allowed(import_path: str, allowed: Sequence[str]) -> tuple[str, str]:
    """Split `package.module:Class` and check the module lies under an allowed prefix."""
    module_name, sep, qualname = import_path.partition(":")
    if not sep or not module_name or not qualname:
        raise InvalidInputError(f"import path {import_path!r} is not package.module:Class")
    if not any(module_name == p or module_name.startswith(p + ".") for p in allowed):
        raise ClassNotAllowedError(import_path, allowed)
    return module_name, qualname


def import_class(
    import_path: str, allowed: Sequence[str], class_path: Sequence[Path] = ()
) -> type[nn.Module]:
    """Import a Module class, refusing paths outside the allowed prefixes before importing;
    folders in `class_path` are searched first."""
    from torch import nn

    module_name, qualname = check_allowed(import_path, allowed)
    _extend_sys_path(class_path)
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise ClassBuildError(f"cannot import {import_path!r}: {exc}") from exc
        raise ClassBuildError(
            f"cannot import {exc.name!r} (for {import_path!r}): add the folder that holds it "
            "with --class-path (MODULESERVE_CLASS_PATH, or class_path in moduleserve.toml), "
            "or install it"
        ) from exc
    except (ImportError, AttributeError) as exc:
        raise ClassBuildError(f"cannot import {import_path!r}: {exc}") from exc
    if not (inspect.isclass(target) and issubclass(target, nn.Module)):
        raise ClassBuildError(f"{import_path!r} is not an nn.Module subclass")
    return target


def _extend_sys_path(folders: Sequence[Path]) -> None:
    for folder in reversed([str(Path(f).resolve()) for f in folders]):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def build_module(
    cls: type[nn.Module], kwargs: Mapping[str, Any], device: str | torch.device = "cpu"
) -> nn.Module:
    """Construct the class with its kwargs on `device` (`meta` allocates no memory)."""
    import torch

    try:
        with torch.device(device):
            return cls(**kwargs)
    except Exception as exc:  # user code: any failure means the kwargs do not build it
        raise ClassBuildError(f"{cls.__name__}(**{dict(kwargs)!r}) failed: {exc}") from exc


def infer_outputs(module: nn.Module, inputs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """Run forward on the meta device to learn the output names, dtypes and shapes; every
    output must have one row per input row (checked at two batch sizes, so that an output
    that happens to be as long as one batch is not taken for rows)."""
    from moduleserve.registry.formats import dtype_name

    runs = [_meta_forward(module, inputs, rows) for rows in (CHECK_ROWS, CHECK_ROWS + 1)]
    specs = []
    for index, (first, second) in enumerate(zip(*runs, strict=True)):
        for rows, out in ((CHECK_ROWS, first), (CHECK_ROWS + 1, second)):
            if out.dim() == 0 or out.shape[0] != rows or out.shape[1:] != first.shape[1:]:
                raise ForwardCheckError(
                    f"output {index} of forward() has shape {list(out.shape)} for {rows} "
                    "input rows: every output needs one row per input row (dimension 0), "
                    "so that batched requests can be split back"
                )
        specs.append(TensorSpec(f"output{index}", dtype_name(first.dtype), (-1, *first.shape[1:])))
    return tuple(specs)


def _meta_forward(
    module: nn.Module, inputs: Sequence[TensorSpec], rows: int
) -> tuple[torch.Tensor, ...]:
    import torch

    args = [
        torch.empty(_check_shape(spec, rows), dtype=_dtype(spec), device="meta") for spec in inputs
    ]
    try:
        with torch.no_grad():
            result = module.eval()(*args)
    except Exception as exc:  # user code
        raise ClassBuildError(f"a forward with the input spec failed: {exc}") from exc
    outputs = []
    for out in _as_tuple(result):
        if not isinstance(out, torch.Tensor):
            raise ClassBuildError(f"forward returned a {type(out).__name__}, not tensors")
        outputs.append(out)
    return tuple(outputs)


def check_forward(module_class: ModuleClass, module: nn.Module, source: str) -> None:
    """Run `CHECK_ROWS` rows of zeros per the input spec through a real module (weights
    loaded); every output must match the output spec, with one row per input row.

    ForwardCheckError names `source` (the pushed file, a stored version) and what failed.
    """
    import torch

    from moduleserve.registry.formats import dtype_name

    inputs = [torch.zeros(_check_shape(spec), dtype=_dtype(spec)) for spec in module_class.inputs]
    where = f"{source} with class {module_class.name!r} ({_spec_text(module_class.inputs)})"
    # User code may draw random numbers: the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.inference_mode():
                result = module.eval()(*inputs)
        except Exception as exc:  # user code: its message says what does not fit
            raise ForwardCheckError(
                f"{where} fails a forward pass on {CHECK_ROWS} rows of zeros: {shorten(exc, 200)}"
            ) from exc
    outputs = _as_tuple(result)
    if len(outputs) != len(module_class.outputs):
        raise ForwardCheckError(
            f"{where} returns {len(outputs)} output(s), the class's output spec has "
            f"{len(module_class.outputs)} ({_spec_text(module_class.outputs)})"
        )
    for spec, out in zip(module_class.outputs, outputs, strict=True):
        if not isinstance(out, torch.Tensor):
            raise ForwardCheckError(f"{where} returns a {type(out).__name__} as {spec.name!r}")
        got = list(out.shape)
        if not got or got[0] != CHECK_ROWS:
            raise ForwardCheckError(
                f"{where} returns output {spec.name!r} of shape {shorten(got)} for "
                f"{CHECK_ROWS} input rows: every output needs one row per input row"
            )
        fits = len(got) == len(spec.shape) and all(
            want in (-1, size) for want, size in zip(spec.shape[1:], got[1:], strict=True)
        )
        if not fits or dtype_name(out.dtype) != spec.dtype:
            raise ForwardCheckError(
                f"{where} returns output {spec.name!r} as {dtype_name(out.dtype)}{got}, "
                f"not {spec.dtype}{list(spec.shape)} as its spec says"
            )


def _check_shape(spec: TensorSpec, rows: int = CHECK_ROWS) -> list[int]:
    """The shape a check feeds: `rows` rows, 1 for any other free dimension."""
    return [rows if i == 0 else 1 if d == -1 else d for i, d in enumerate(spec.shape)]


def _dtype(spec: TensorSpec) -> torch.dtype:
    from moduleserve.registry.formats import parse_dtype

    return parse_dtype(spec.dtype)


def _as_tuple(result: object) -> tuple[object, ...]:
    return tuple(result) if isinstance(result, tuple | list) else (result,)


def _spec_text(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name}:{s.dtype}:{','.join(str(d) for d in s.shape)}" for s in specs)


def name_outputs(
    inferred: Sequence[TensorSpec], given: Sequence[TensorSpec]
) -> tuple[TensorSpec, ...]:
    """The output spec: `given` (names chosen by the user) checked against what forward()
    returns, else `inferred` (output0, output1, …)."""
    if not given:
        return tuple(inferred)
    _check_specs(given, "output")
    if len(given) != len(inferred):
        raise InvalidInputError(
            f"forward() returns {len(inferred)} output(s) ({_spec_text(inferred)}), but "
            f"{len(given)} output spec(s) were given"
        )
    for want, got in zip(given, inferred, strict=True):
        fits = len(want.shape) == len(got.shape) and all(
            w in (-1, g) for w, g in zip(want.shape, got.shape, strict=True)
        )
        if not fits or want.dtype != got.dtype:
            raise InvalidInputError(
                f"output {want.name!r}: forward() returns {got.dtype}:"
                f"{','.join(str(d) for d in got.shape)}, not {want.dtype}:"
                f"{','.join(str(d) for d in want.shape)}"
            )
    return tuple(given)


class ClassCatalog:
    """Registered Module classes, stored in the database."""

    def __init__(
        self, db: Database, allowed_prefixes: Sequence[str], class_path: Sequence[Path] = ()
    ) -> None:
        self._db = db
        self.allowed_prefixes = list(allowed_prefixes)
        self.class_path = list(class_path)

    def register(
        self,
        name: str,
        import_path: str,
        kwargs: Mapping[str, Any] | None = None,
        inputs: Sequence[TensorSpec] = (),
        description: str = "",
        outputs: Sequence[TensorSpec] = (),
    ) -> ModuleClass:
        """Check the class imports, builds with `kwargs` and runs on `inputs` (on the meta
        device: no weights yet), then record it. `outputs` names what forward() returns
        (checked against it); by default they are output0, output1, …"""
        check_name("class", name)
        kwargs = dict(kwargs or {})
        inputs, outputs = self._checked_specs(import_path, kwargs, inputs, outputs)
        row = ModuleClassRow(
            name=name,
            import_path=import_path,
            kwargs=kwargs,
            inputs=[s.to_dict() for s in inputs],
            outputs=[s.to_dict() for s in outputs],
            description=description,
        )
        with self._db.write() as session:
            if session.scalar(sa.select(ModuleClassRow.id).where(ModuleClassRow.name == name)):
                raise AlreadyExistsError(f"module class {name!r} is already registered")
            session.add(row)
        return class_from_row(row)

    def _checked_specs(
        self,
        import_path: str,
        kwargs: Mapping[str, Any],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The input and output specs, checked against the class built on the meta device."""
        if not inputs:
            raise InvalidInputError("a class needs at least one input spec (name:dtype:shape)")
        _check_specs(inputs, "input")
        cls = import_class(import_path, self.allowed_prefixes, self.class_path)
        module = build_module(cls, kwargs, device="meta")
        _check_forward_params(cls, module, inputs)
        return tuple(inputs), name_outputs(infer_outputs(module, inputs), outputs)

    def revise(
        self,
        name: str,
        *,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        description: str | None = None,
    ) -> ModuleClass:
        """The class as `Registry.update_class` would store it, checked on the meta device.

        New inputs keep the output names when forward() still returns as many outputs."""
        current = self.get(name)
        if not inputs and not outputs:
            revised = current
        else:
            new_inputs, new_outputs = self._checked_specs(
                current.import_path, current.kwargs, inputs or current.inputs, outputs
            )
            if not outputs and len(new_outputs) == len(current.outputs):
                new_outputs = tuple(
                    replace(new, name=old.name)
                    for new, old in zip(new_outputs, current.outputs, strict=True)
                )
            revised = replace(current, inputs=new_inputs, outputs=new_outputs)
        return revised if description is None else replace(revised, description=description)

    def versions_of(self, name: str) -> dict[str, builtins.list[str]]:
        """Digest → the `model:version` entries of the class's models stored under it."""
        with self._db.read() as session:
            return _versions_of(session, _class_row(session, name).id)

    def save(self, revised: ModuleClass, checked: Mapping[str, Sequence[str]]) -> ModuleClass:
        """Store a revised spec and description; refused (WriteConflictError, nothing
        changed) when the class's versions are no longer the `checked` ones."""
        with self._db.write() as session:
            # Locked: a push checks against the spec it read, then records its version
            # holding a share lock on this row (Checkpoints._model_for_push).
            row = _class_row(session, revised.name, lock=True)
            if set(_versions_of(session, row.id)) != set(checked):
                raise WriteConflictError(
                    f"versions of class {revised.name!r} were pushed or deleted while they "
                    "were checked against the new spec; nothing was changed, run it again"
                )
            row.inputs = [s.to_dict() for s in revised.inputs]
            row.outputs = [s.to_dict() for s in revised.outputs]
            row.description = revised.description
            session.flush()
            return class_from_row(row)

    def delete(self, name: str) -> ModuleClass:
        """Remove a class; refused (ClassInUseError) while any stored version uses it. A
        model left with no versions keeps its name and numbering; its next push names a
        class again."""
        with self._db.write() as session:
            row = _class_row(session, name, lock=True)
            users = sorted(
                (user for users in _versions_of(session, row.id).values() for user in users),
                key=_version_order,
            )
            if users:
                raise ClassInUseError(name, users)
            deleted = class_from_row(row)
            session.execute(
                sa.update(ModelRow).where(ModelRow.class_id == row.id).values(class_id=None)
            )
            session.delete(row)
            return deleted

    def get(self, name: str) -> ModuleClass:
        """The class registered under `name`."""
        with self._db.read() as session:
            row = session.scalar(sa.select(ModuleClassRow).where(ModuleClassRow.name == name))
            if row is None:
                raise ClassNotFoundError(name)
            return class_from_row(row)

    def list(self) -> list[ModuleClass]:
        """Every registered class, by name."""
        with self._db.read() as session:
            rows = session.scalars(sa.select(ModuleClassRow).order_by(ModuleClassRow.name))
            return [class_from_row(r) for r in rows]

    def build(self, module_class: ModuleClass, device: str | torch.device = "cpu") -> nn.Module:
        """Import (prefix-checked again: settings may have narrowed) and construct the class."""
        cls = import_class(module_class.import_path, self.allowed_prefixes, self.class_path)
        return build_module(cls, module_class.kwargs, device)


def _check_forward_params(cls: type, module: nn.Module, inputs: Sequence[TensorSpec]) -> None:
    """Input names must match forward()'s parameters, so named OIP inputs map onto them."""
    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [p.name for p in params]
    given = [spec.name for spec in inputs]
    required = [p.name for p in params if p.default is p.empty]
    if given != names[: len(given)] or len(given) < len(required):
        raise InvalidInputError(
            f"inputs {given} do not match {cls.__name__}.forward({', '.join(names)}); "
            "name them after forward()'s parameters, in order"
        )


def _class_row(session: Session, name: str, *, lock: bool = False) -> ModuleClassRow:
    query = sa.select(ModuleClassRow).where(ModuleClassRow.name == name)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise ClassNotFoundError(name)
    return row


def _versions_of(session: Session, class_id: int) -> dict[str, builtins.list[str]]:
    rows = session.execute(
        sa.select(VersionRow.digest, ModelRow.name, VersionRow.version)
        .join(ModelRow, ModelRow.id == VersionRow.model_id)
        .where(ModelRow.class_id == class_id)
        .order_by(ModelRow.name, VersionRow.version)
    )
    result: dict[str, list[str]] = {}
    for digest, model, number in rows:
        result.setdefault(digest, []).append(f"{model}:{number}")
    return result


def _version_order(ref: str) -> tuple[str, int]:
    model, _, number = ref.rpartition(":")
    return model, int(number)


def class_from_row(row: ModuleClassRow) -> ModuleClass:
    """Row → entity."""
    return ModuleClass(
        name=row.name,
        import_path=row.import_path,
        kwargs=dict(row.kwargs),
        inputs=tuple(TensorSpec.from_dict(s) for s in row.inputs),
        outputs=tuple(TensorSpec.from_dict(s) for s in row.outputs),
        description=row.description,
        created_at=row.created_at,
    )
