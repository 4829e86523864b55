"""`moduleserve inspect MODEL[:VERSION] tree|params|buffers|tensor NAME|diff OTHER`.

Tables for people; `--json` (global, or after the view) for scripts. Errors are one
sentence on stderr and exit status 1. The views and the rendering of the client's
dataclasses are shared with the offline `moduleserve-registry inspect`.
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
from moduleserve.client.introspection import (
    DiffMetrics,
    IntrospectionClient,
    KindFilter,
    ModelVersion,
    ModuleTree,
    TensorListing,
    TensorSummary,
    Totals,
    VersionDiff,
)
from moduleserve.client.tables import format_table, human_bytes, report_error, to_json

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


# -- rendering: the client's dataclasses to text, or to JSON with `as_json` ------------------


def render_tree(tree: ModuleTree, *, as_json: bool = False) -> str:
    """The tree like print(model), with counts, under a header and over the totals."""
    if as_json:
        return to_json(tree.to_dict())
    return f"{_header(tree.model)}\n{tree.text}\n{format_totals(tree.totals)}"


def render_listing(listing: TensorListing, kind: KindFilter, *, as_json: bool = False) -> str:
    """The listing of `kind` tensors (a GRAD column for parameters)."""
    if as_json:
        return to_json(listing.to_dict())
    return format_listing(listing, with_grad=kind == "parameters")


def render_values(name: str, values: np.ndarray, *, as_json: bool = False) -> str:
    """One tensor's values under a line with its name, dtype and shape."""
    if as_json:
        data = {"name": name, "dtype": str(values.dtype), "shape": list(values.shape)}
        return to_json({**data, "values": values.tolist()})
    with np.printoptions(precision=6, threshold=1000, edgeitems=4, linewidth=100):
        return f"{name} {values.dtype}{list(values.shape)}:\n{values}"


def render_diff(diff: VersionDiff, *, as_json: bool = False) -> str:
    """Per-key changes and summary counts."""
    return to_json(diff.to_dict()) if as_json else format_diff(diff)


def split_ref(text: str) -> tuple[str, str]:
    """ "mlp:2" → ("mlp", "2"); "mlp" → ("mlp", "") (the default version)."""
    model, _, version = text.partition(":")
    return model, version


def format_listing(listing: TensorListing, *, with_grad: bool) -> str:
    """The tensors as a table, then the module's totals."""
    headers = ["NAME", "SHAPE", "DTYPE", "NUMEL"] + (["GRAD"] if with_grad else [])
    headers += ["TIED_TO", "MEAN", "STD", "MIN", "MAX", "NORM", "ZEROS", "NAN", "INF"]
    rows = [_summary_row(s, with_grad) for s in listing.tensors]
    table = format_table(headers, rows) if rows else "no tensors match"
    return f"{_header(listing.model)}\n{table}\n{format_totals(listing.totals)}"


def _summary_row(summary: TensorSummary, with_grad: bool) -> list[Any]:
    stats = summary.stats
    row: list[Any] = [summary.name, list(summary.shape), summary.dtype, f"{summary.numel:,}"]
    if with_grad:
        row.append("yes" if summary.requires_grad else "frozen")
    row.append(",".join(summary.tied_to) or "-")
    if stats is None:
        return row + ["-"] * 8
    figures = (stats.mean, stats.std, stats.min, stats.max, stats.norm)
    row += [_number(v) for v in figures]
    return [*row, f"{stats.zero_fraction:.1%}", stats.nan_count, stats.inf_count]


def format_totals(totals: Totals) -> str:
    """One line: parameter counts (trainable, frozen), bytes, and buffers."""
    return (
        f"parameters: {totals.parameters:,} (trainable {totals.trainable:,}, "
        f"frozen {totals.frozen:,}), {human_bytes(totals.parameter_bytes)} "
        f"in {totals.parameter_tensors} tensors; buffers: {totals.buffer_elements:,} elements, "
        f"{human_bytes(totals.buffer_bytes)} in {totals.buffer_tensors} tensors"
    )


def format_diff(diff: VersionDiff) -> str:
    """Per-key changes as a table, keys only on one side, and the summary counts."""
    rows = []
    for entry in diff.entries:
        metrics = entry.metrics
        if metrics is None:
            what = "shape" if entry.shape_mismatch else "dtype"
            base = entry.shape_base if entry.shape_mismatch else entry.dtype_base
            other = entry.shape_other if entry.shape_mismatch else entry.dtype_other
            rows.append([entry.name, entry.kind, f"{what} {base} -> {other}"] + ["-"] * 4)
            continue
        rows.append(
            [
                entry.name,
                entry.kind,
                "changed" if entry.changed else "same",
                _changed_count(metrics),
                _number(metrics.diff_norm),
                _number(metrics.relative_change),
                _number(metrics.max_abs_diff),
            ]
        )
    headers = ["NAME", "KIND", "STATUS", "CHANGED", "DIFF_NORM", "RELATIVE", "MAX_ABS_DIFF"]
    lines = [f"{diff.other} against {diff.base}", format_table(headers, rows)]
    for side, keys in ((diff.base, diff.only_base), (diff.other, diff.only_other)):
        if keys:
            lines.append(f"only in {side}: {', '.join(keys)}")
    lines.append(
        f"{diff.compared} compared: {diff.changed} changed, {diff.unchanged} unchanged, "
        f"{diff.mismatched} mismatched; {len(diff.only_base)} only in {diff.base}, "
        f"{len(diff.only_other)} only in {diff.other}"
    )
    return "\n".join(lines)


def _changed_count(metrics: DiffMetrics) -> str:
    """Changed elements, saying how many involve NaN or Inf (the norms leave those out)."""
    text = f"{metrics.changed_elements:,}"
    if metrics.nonfinite_changed:
        text += f" ({metrics.nonfinite_changed:,} non-finite)"
    return text


def _header(version: ModelVersion) -> str:
    """ "net:1 (net)", marked when the figures come from the served module."""
    served = ", loaded" if version.loaded else ""
    return f"{version} ({version.class_name}{served})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[IntrospectionClient]:
    """An introspection client for the global options; failures become one sentence."""
    token = getattr(args, "token", None)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    timeout = getattr(args, "timeout", 60.0)
    with ModelClient(args.target, token=token, timeout=timeout) as client:
        yield IntrospectionClient(client.channel, metadata=metadata, timeout=timeout)
