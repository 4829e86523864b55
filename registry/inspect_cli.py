"""`moduleserve-registry inspect`: the views of `moduleserve inspect`, offline, from the registry.

Versions are built on the CPU straight from the registry (no server); the results of
``registry.inspection`` are turned into the client's dataclasses by `to_client` and
printed by the client's own renderers, so both commands print the same tables and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from moduleserve.client import introspection as client_side
from moduleserve.client.inspect_cli import (
    add_views,
    render_diff,
    render_listing,
    render_tree,
    render_values,
)
from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.names import split_ref

# registry.inspection and registry.introspect import torch: they are imported inside the
# commands, so that `moduleserve-registry` commands without weights start fast.

Handler = Callable[[Registry, argparse.Namespace], int]

# registry.introspect compares a and b; the client's dataclasses call them base and other.
_RENAMED = {
    "norm_a": "norm_base",
    "shape_a": "shape_base",
    "shape_b": "shape_other",
    "dtype_a": "dtype_base",
    "dtype_b": "dtype_other",
    "only_a": "only_base",
    "only_b": "only_other",
}


def add_inspect_command(commands: Any) -> None:
    """Register `inspect` and its views on the `moduleserve-registry` sub-command parsers."""
    text = "show a version's module tree, tensors, values or diff, offline from the registry"
    inspect = commands.add_parser("inspect", help=text, description=text)
    inspect.add_argument(
        "model",
        metavar="MODEL[:VERSION|:ALIAS]",
        help="model name, then :VERSION or :ALIAS (default: the default alias, else the latest)",
    )
    add_views(
        inspect, {"tree": cmd_tree, "tensors": cmd_tensors, "tensor": cmd_tensor, "diff": cmd_diff}
    )


def to_client(result: Any, kinds: Mapping[str, str] | None = None, **extra: Any) -> Any:
    """A registry.introspect result as the client's dataclass of the same name, recursively.

    Fields a and b become base and other; a StateDiff becomes a VersionDiff whose entries
    take their kind from `kinds`. `extra` gives the fields the result lacks (base, other).
    """
    from moduleserve.registry import introspect

    if isinstance(result, list | tuple):
        return tuple(to_client(item, kinds) for item in result)
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    fields = {
        _RENAMED.get(field.name, field.name): to_client(getattr(result, field.name), kinds)
        for field in dataclasses.fields(result)
    }
    if isinstance(result, introspect.TensorDiff):
        fields["kind"] = (kinds or {}).get(result.name, "")
    name = "VersionDiff" if isinstance(result, introspect.StateDiff) else type(result).__name__
    return getattr(client_side, name)(**fields, **extra)


def _one_sentence(func: Handler) -> Handler:
    """Refusals of the plain functions (bad slice, unknown tensor...) exit 1 like the others."""

    @functools.wraps(func)
    def wrapper(registry: Registry, args: argparse.Namespace) -> int:
        from moduleserve.registry import introspect

        try:
            return func(registry, args)
        except (introspect.IntrospectionError, ValueError) as exc:
            raise InvalidInputError(str(exc)) from exc

    return wrapper


def _resolve(registry: Registry, args: argparse.Namespace) -> Version:
    return registry.checkpoints.resolve(*split_ref(args.model))


def _model_version(version: Version) -> client_side.ModelVersion:
    return client_side.ModelVersion(version.model, version.version, version.class_name, False)


@_one_sentence
def cmd_tree(registry: Registry, args: argparse.Namespace) -> int:
    """Print the module tree like print(model), with counts (built on meta: no weights read)."""
    from moduleserve.registry import inspection, introspect

    version = _resolve(registry, args)
    nodes, totals = inspection.tree(registry, version)
    text = introspect.format_tree(nodes)
    model = _model_version(version)
    tree = client_side.ModuleTree(model, to_client(nodes), to_client(totals), text)
    print(render_tree(tree, as_json=args.json))
    return 0


@_one_sentence
def cmd_tensors(registry: Registry, args: argparse.Namespace) -> int:
    """Print parameters or buffers with statistics, then the module's totals."""
    from moduleserve.registry import inspection, introspect

    if args.pattern is not None:
        introspect.check_pattern(args.pattern)  # refuse before any weights are read
    version = _resolve(registry, args)
    summaries, totals = inspection.summaries(registry, version, args.kind, args.pattern)
    listing = client_side.TensorListing(
        _model_version(version), to_client(summaries), to_client(totals)
    )
    print(render_listing(listing, args.kind, as_json=args.json))
    return 0


@_one_sentence
def cmd_tensor(registry: Registry, args: argparse.Namespace) -> int:
    """Print one tensor's values, as the client decodes them (bfloat16 widened to float32)."""
    from moduleserve.registry import inspection, introspect

    cap = inspection.element_cap(args.max_elements or 0)
    version = _resolve(registry, args)
    tensor = inspection.values(registry, version, args.name, args.slices, cap)
    dtype = str(tensor.dtype).removeprefix("torch.")
    values = client_side.decode_tensor(dtype, tuple(tensor.shape), introspect.tensor_bytes(tensor))
    print(render_values(args.name, values, as_json=args.json))
    return 0


@_one_sentence
def cmd_diff(registry: Registry, args: argparse.Namespace) -> int:
    """Print per-tensor changes of OTHER against MODEL[:VERSION] and summary counts."""
    from moduleserve.registry import inspection

    base_ref = split_ref(args.model)
    other_ref = split_ref(args.other if ":" in args.other else f"{base_ref[0]}:{args.other}")
    base, other, diff, kinds = inspection.diff(registry, base_ref, other_ref)
    result = to_client(diff, kinds, base=_model_version(base), other=_model_version(other))
    print(render_diff(result, as_json=args.json))
    return 0
