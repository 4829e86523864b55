"""`moduleserve inspect MODEL[:VERSION] tree|params|buffers|tensor NAME|diff OTHER`.

Tables for people; `--json` (global, or after the view) for scripts. Errors are one
sentence on stderr and exit status 1. The views (here) and their rendering
(`inspect_render`) are shared with the offline `moduleserve-registry inspect`.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import ModuleServeError
from moduleserve.client.inspect_render import (
    render_diff,
    render_listing,
    render_tree,
    render_values,
)
from moduleserve.client.introspection import IntrospectionClient
from moduleserve.client.introspection_results import KindFilter
from moduleserve.client.refs import split_ref
from moduleserve.client.tables import report_error

Handler = Callable[[argparse.Namespace], int]


def _one_sentence_errors(func: Handler) -> Handler:
    """Expected failures print one sentence on stderr, as every `moduleserve` command: exit 1."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ModuleServeError, ValueError, OSError) as exc:
            return report_error(exc, args)

    return wrapper


def add_inspect_command(subparsers: Any) -> None:
    """Register `inspect` and its views on the `moduleserve` sub-command parsers."""
    text = "show a model version's module tree, tensors, values or diff against another"
    inspect = subparsers.add_parser("inspect", help=text, description=text)
    inspect.add_argument(
        "model", metavar="MODEL[:VERSION]", help="model name, then :VERSION or :ALIAS"
    )
    handlers = {"tree": cmd_tree, "tensors": cmd_tensors, "tensor": cmd_tensor, "diff": cmd_diff}
    tensor = add_views(inspect, handlers)["tensor"]
    tensor.add_argument("--out", type=Path, metavar="FILE.npy", help="also save the values")


def add_views(
    inspect: argparse.ArgumentParser, handlers: Mapping[str, Callable[..., int]]
) -> dict[str, argparse.ArgumentParser]:
    """Add the views tree, params, buffers, tensor and diff to an `inspect` parser.

    `handlers` maps "tree", "tensors", "tensor" and "diff" to each view's `func`.
    Returns the view parsers by name, for options of one CLI only.
    """
    views = inspect.add_subparsers(dest="view", required=True, metavar="VIEW")
    parsers: dict[str, argparse.ArgumentParser] = {}

    def view(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = views.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: absent here leaves the global --json as it was.
        sub.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
        )
        sub.set_defaults(func=func)
        parsers[name] = sub
        return sub

    view("tree", handlers["tree"], "every submodule with its parameter counts")
    for name, kind in (("params", "parameters"), ("buffers", "buffers")):
        sub = view(name, handlers["tensors"], f"{kind} with shapes, dtypes and statistics")
        sub.add_argument("--pattern", metavar="GLOB", help="only names matching, e.g. 'fc.*'")
        sub.set_defaults(kind=kind)
    tensor = view("tensor", handlers["tensor"], "one tensor's values")
    tensor.add_argument("name", help="qualified name, e.g. block1.bn.running_mean")
    tensor.add_argument("--slice", dest="slices", metavar="INDEX", help="numpy index, e.g. '0:2,:'")
    tensor.add_argument("--max-elements", type=int, metavar="N", help="refuse more (262144)")
    diff = view("diff", handlers["diff"], "per-tensor changes of OTHER against MODEL[:VERSION]")
    diff.add_argument("other", metavar="OTHER", help="version or alias of MODEL, or MODEL:VERSION")
    return parsers


@_one_sentence_errors
def cmd_tree(args: argparse.Namespace) -> int:
    """Print the module tree like print(model), with counts."""
    model, version = split_ref(args.model)
    with _session(args) as inspect:
        tree = inspect.tree(model, version)
    print(render_tree(tree, as_json=args.json))
    return 0


@_one_sentence_errors
def cmd_tensors(args: argparse.Namespace) -> int:
    """Print parameters or buffers with statistics, then the module's totals."""
    model, version = split_ref(args.model)
    kind: KindFilter = args.kind
    with _session(args) as inspect:
        listing = inspect.tensors(model, version, kind=kind, pattern=args.pattern)
    print(render_listing(listing, kind, as_json=args.json))
    return 0


@_one_sentence_errors
def cmd_tensor(args: argparse.Namespace) -> int:
    """Print (and optionally save) one tensor's values."""
    model, version = split_ref(args.model)
    with _session(args) as inspect:
        values = inspect.tensor(
            model, args.name, version, slices=args.slices, max_elements=args.max_elements
        )
    if args.out is not None:
        np.save(args.out, values, allow_pickle=False)
    print(render_values(args.name, values, as_json=args.json))
    if args.out is not None and not args.json:
        print(f"saved to {args.out}")
    return 0


@_one_sentence_errors
def cmd_diff(args: argparse.Namespace) -> int:
    """Print per-tensor changes of OTHER against MODEL[:VERSION] and summary counts."""
    model, version = split_ref(args.model)
    other_model, other_version = split_ref(args.other) if ":" in args.other else (model, args.other)
    with _session(args) as inspect:
        diff = inspect.diff(model, version, other_version, other_model=other_model)
    print(render_diff(diff, as_json=args.json))
    return 0


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[IntrospectionClient]:
    """An introspection client for the global options; failures become one sentence."""
    token = getattr(args, "token", None)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    timeout = getattr(args, "timeout", 60.0)
    with ModelClient(args.target, token=token, timeout=timeout) as client:
        yield IntrospectionClient(client.channel, metadata=metadata, timeout=timeout)
