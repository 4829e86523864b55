"""`moduleserve-registry inspect`: the views of `moduleserve inspect`, offline, from the registry.

Versions are built on the CPU straight from the registry (no server). ``registry.inspection``
returns the client's own result dataclasses, printed by the client's renderers, so both
commands print the same tables and JSON.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from moduleserve.client.inspect_cli import add_views
from moduleserve.client.inspect_render import (
    format_tree,
    render_diff,
    render_listing,
    render_tree,
    render_values,
)
from moduleserve.client.introspection import UnsupportedDtypeError, decode_tensor
from moduleserve.client.introspection_results import (
    ModelVersion,
    ModuleTree,
    TensorListing,
    VersionDiff,
)
from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Version
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.names import parse_model_ref

# registry.inspection and registry.introspect import torch: they are imported inside the
# commands, so that `moduleserve-registry` commands without weights start fast.

Handler = Callable[[Registry, argparse.Namespace], int]


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


def _one_sentence(func: Handler) -> Handler:
    """Refusals of the plain functions (bad slice, unknown tensor...) and values the client
    cannot decode exit 1 like the others; any other error stays a bug, with its traceback."""

    @functools.wraps(func)
    def wrapper(registry: Registry, args: argparse.Namespace) -> int:
        from moduleserve.registry import introspect

        try:
            return func(registry, args)
        except (introspect.IntrospectionError, UnsupportedDtypeError) as exc:
            raise InvalidInputError(str(exc)) from exc

    return wrapper


def _resolve(registry: Registry, args: argparse.Namespace) -> Version:
    return registry.checkpoints.resolve(*parse_model_ref(args.model))


def _model_version(version: Version) -> ModelVersion:
    """A stored version as the results name it (never `loaded`: there is no server)."""
    return ModelVersion(version.model, version.version, version.class_name, False)


@_one_sentence
def cmd_tree(registry: Registry, args: argparse.Namespace) -> int:
    """Print the module tree like print(model), with counts (built on meta: no weights read)."""
    from moduleserve.registry import inspection

    version = _resolve(registry, args)
    nodes, totals = inspection.tree(registry, version)
    tree = ModuleTree(_model_version(version), tuple(nodes), totals, format_tree(nodes))
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
    listing = TensorListing(_model_version(version), tuple(summaries), totals)
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
    values = decode_tensor(dtype, tuple(tensor.shape), introspect.tensor_bytes(tensor))
    print(render_values(args.name, values, as_json=args.json))
    return 0


@_one_sentence
def cmd_diff(registry: Registry, args: argparse.Namespace) -> int:
    """Print per-tensor changes of OTHER against MODEL[:VERSION] and summary counts."""
    from moduleserve.registry import inspection

    base_ref = parse_model_ref(args.model)
    other_ref = parse_model_ref(args.other if ":" in args.other else f"{base_ref[0]}:{args.other}")
    base, other, diff = inspection.diff(registry, base_ref, other_ref)
    result = VersionDiff.of(_model_version(base), _model_version(other), diff)
    print(render_diff(result, as_json=args.json))
    return 0
