"""What `moduleserve inspect` and `moduleserve-registry inspect` print: introspection results
as text for people, or as JSON with `as_json`.

`format_tree` also writes the `text` of a GetModuleTree reply, so the server, the client and
the offline registry CLI render a module tree the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from moduleserve.client.introspection_results import (
    DiffMetrics,
    KindFilter,
    ModelVersion,
    ModuleNode,
    ModuleTree,
    TensorListing,
    TensorSummary,
    Totals,
    VersionDiff,
)
from moduleserve.client.tables import format_table, human_bytes, to_json


def format_tree(nodes: Iterable[ModuleNode]) -> str:
    """Render nodes as an indented tree like `print(model)`, with counts on each line."""
    lines = []
    for node in nodes:
        label = node.name.rsplit(".", 1)[-1] + ": " if node.name else ""
        extra = " ".join(part.strip() for part in node.extra_repr.splitlines())
        frozen = f", frozen {node.frozen:,}" if node.frozen else ""
        counts = f"params={node.parameters:,} (trainable {node.trainable:,}{frozen})"
        lines.append(f"{'  ' * node.depth}{label}{node.class_name}({extra})  {counts}")
    return "\n".join(lines)


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
