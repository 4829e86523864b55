"""The Module class catalog: import paths checked against allowed prefixes, specs, building."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from moduleserve.registry.db import Database
from moduleserve.registry.entities import ModuleClass, TensorSpec
from moduleserve.registry.errors import (
    AlreadyExistsError,
    ClassBuildError,
    ClassNotAllowedError,
    ClassNotFoundError,
    InvalidInputError,
)
from moduleserve.registry.names import check_name
from moduleserve.registry.orm import ModuleClassRow

# torch is imported by the functions that build or check a class, not here: reading the
# catalog (`classes list`, `show`) then does not pay torch's 1-2 s import.
if TYPE_CHECKING:
    import torch
    from torch import nn


def parse_input_spec(text: str) -> TensorSpec:
    """Parse `name:dtype:shape`, e.g. `x:float32:-1,3,8,8` (-1 marks the batch dimension)."""
    from moduleserve.registry.formats import parse_dtype

    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidInputError(f"input spec {text!r} is not name:dtype:shape (x:float32:-1,4)")
    name, dtype, shape_text = parts
    if not name.isidentifier():
        raise InvalidInputError(f"input spec {text!r}: {name!r} is not a Python identifier")
    try:
        parse_dtype(dtype)
        shape = tuple(int(d) for d in shape_text.split(","))
    except ValueError as exc:
        raise InvalidInputError(f"input spec {text!r}: {exc}") from exc
    if any(d < -1 or d == 0 for d in shape):
        raise InvalidInputError(f"input spec {text!r}: dimensions are positive or -1")
    return TensorSpec(name, dtype, shape)


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
    """Run a forward on the meta device to learn the output names, dtypes and shapes."""
    import torch

    from moduleserve.registry.formats import dtype_name, parse_dtype

    args = [
        torch.empty(
            [1 if d == -1 else d for d in spec.shape], dtype=parse_dtype(spec.dtype), device="meta"
        )
        for spec in inputs
    ]
    try:
        with torch.no_grad():
            result = module.eval()(*args)
    except Exception as exc:  # user code
        raise ClassBuildError(f"a forward with the input spec failed: {exc}") from exc
    outputs = result if isinstance(result, tuple | list) else (result,)
    specs = []
    for index, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor):
            raise ClassBuildError(f"forward returned a {type(out).__name__}, not tensors")
        shape = tuple(
            -1 if i == 0 and inputs[0].shape[0] == -1 else d for i, d in enumerate(out.shape)
        )
        specs.append(TensorSpec(f"output{index}", dtype_name(out.dtype), shape))
    return tuple(specs)


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
    ) -> ModuleClass:
        """Check the class imports, builds with `kwargs` and runs on `inputs`, then record it."""
        check_name("class", name)
        if not inputs:
            raise InvalidInputError("a class needs at least one input spec (name:dtype:shape)")
        kwargs = dict(kwargs or {})
        cls = import_class(import_path, self.allowed_prefixes, self.class_path)
        module = build_module(cls, kwargs, device="meta")
        _check_forward_params(cls, module, inputs)
        outputs = infer_outputs(module, inputs)
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
