"""Pure text renderers of jobs, job events, loss curves and datasets for the `moduleserve` CLI."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moduleserve.client.jobs import DatasetInfo, JobEventInfo, JobInfo
from moduleserve.client.tables import format_table, human_bytes

Series = dict[str, list[tuple[float, float]]]

JOB_HEADERS = (
    "JOB",
    "MODEL",
    "BASE",
    "DATASET",
    "STATE",
    "EPOCH",
    "LOSS",
    "VAL LOSS",
    "RESULT",
    "CREATED",
)
DATASET_HEADERS = ("DATASET", "TENSORS", "SIZE", "DIGEST", "CREATED", "DESCRIPTION")
MARKS = "*o+x#@%&"
TRAIN_LOSS, VAL_LOSS = "train loss", "val loss"
PLOT_NEEDS = "writing a PNG needs matplotlib: pip install 'moduleserve[plot]'"


def format_time(at: float | None, *, seconds: bool = True) -> str:
    """Unix seconds as local "2026-11-28 20:01:02"; "-" when not reached."""
    if not at:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.localtime(at))


def format_duration(seconds: float) -> str:
    """75 → "1m15s", 3725 → "1h02m", 9 → "9s"."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fraction(event: JobEventInfo) -> float:
    """How far the job is, from the steps when known, else from the epochs."""
    if event.total_steps > 0:
        return min(1.0, event.step / event.total_steps)
    return min(1.0, event.epoch / event.epochs) if event.epochs > 0 else 0.0


def format_progress(event: JobEventInfo, val_loss: float | None = None, bar_width: int = 20) -> str:
    """One status line: epoch, step, a bar, loss, val loss, examples/s and ETA.

    Progress events seldom carry a validation loss: `val_loss` (the last epoch's) stands in.
    """
    fraction = _fraction(event)
    filled = round(fraction * bar_width)
    bar = "[" + "#" * filled + "." * (bar_width - filled) + f"] {fraction:4.0%}"
    parts = [f"epoch {event.epoch}/{event.epochs}", f"step {event.step}/{event.total_steps}", bar]
    parts.append(f"loss {_loss(event.loss)}")
    val_loss = event.val_loss if event.val_loss is not None else val_loss
    if val_loss is not None:
        parts.append(f"val loss {_loss(val_loss)}")
    if event.examples_per_second:
        parts.append(f"{event.examples_per_second:.0f} ex/s")
    if event.eta_seconds:
        parts.append(f"ETA {format_duration(event.eta_seconds)}")
    return "  ".join(parts)


def format_event(event: JobEventInfo) -> str:
    """One log line: time, the epoch, then what the event says."""
    parts = [format_time(event.at)]
    if event.epochs:
        parts.append(f"[epoch {event.epoch}/{event.epochs}]")
    parts.append(_event_text(event))
    return " ".join(parts)


def _event_text(event: JobEventInfo) -> str:
    if event.kind == "progress":
        text = f"step {event.step}/{event.total_steps} loss {_loss(event.loss)}"
        if event.val_loss is not None:
            text += f" val loss {_loss(event.val_loss)}"
        return text + f" lr {event.learning_rate:.4g} {event.examples_per_second:.0f} ex/s"
    if event.kind == "epoch":
        text = f"finished: train loss {_loss(event.loss)}"
        if event.val_loss is not None:
            text += f" val loss {_loss(event.val_loss)}"
        return f"{text} {event.message}".rstrip()
    if event.kind == "state":
        text = event.state + (f" (attempt {event.attempt})" if event.attempt > 1 else "")
        return f"{text}: {event.message}" if event.message else text
    return event.message


def format_queued(job: JobInfo) -> str:
    """ "job <id> queued (mlp:1 on dataset pairs)"."""
    return f"job {job.id} {job.state} ({job.model}:{job.base_version} on dataset {job.dataset})"


def format_summary(job: JobInfo) -> str:
    """The last line of a followed job: what it registered, or why it did not."""
    if job.state == "succeeded":
        text = f"job {job.id} succeeded: registered {job.model}:{job.result_version}"
        if job.alias_moved:
            text += f" and moved alias {job.alias}"
        elif job.alias:
            text += f" (alias {job.alias} not moved: {job.reason or 'it moved meanwhile'})"
        return text
    if job.state in ("failed", "cancelled"):
        return f"job {job.id} {job.state}: {job.reason or 'no reason given'}"
    return f"job {job.id} is {job.state}: 'moduleserve jobs watch {job.id}' follows it again"


def job_row(job: JobInfo) -> list[Any]:
    """The `jobs list` cells of one job (see JOB_HEADERS)."""
    progress = job.progress
    if progress is not None and progress.epochs:
        epoch = f"{progress.epoch}/{progress.epochs}"
    else:
        epoch = f"{len(job.epochs)}/{job.spec.get('epochs', '?')}"
    state = job.state + (" (cancelling)" if job.cancel_requested and job.state == "running" else "")
    result = f"{job.model}:{job.result_version}" if job.result_version else "-"
    loss, val = _latest_losses(job)
    created = format_time(job.created_at, seconds=False)
    row = [job.id, job.model, job.base_version, job.dataset, state, epoch]
    return [*row, _loss(loss), _loss(val), result, created]


def _latest_losses(job: JobInfo) -> tuple[float | None, float | None]:
    """The latest train loss (progress, else last epoch) and the latest validation loss."""
    loss = job.progress.loss if job.progress is not None else None
    if loss is None and job.epochs:
        loss = job.epochs[-1].train_loss
    val = next((e.val_loss for e in reversed(job.epochs) if e.val_loss is not None), None)
    return loss, val


def format_job(job: JobInfo) -> str:
    """`jobs show`: key: value details, the hyperparameters and the per-epoch table."""
    result = f"{job.model}:{job.result_version}" if job.result_version else "-"
    alias = f"{job.alias} ({'moved' if job.alias_moved else 'not moved'})" if job.alias else "-"
    details = [
        ("job", job.id),
        ("model", f"{job.model}:{job.base_version}"),
        ("dataset", job.dataset),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested else "")),
        ("reason", job.reason or "-"),
        ("result", result),
        ("alias", alias),
        ("created", f"{format_time(job.created_at)} by {job.created_by or '-'}"),
        ("started", format_time(job.started_at)),
        ("finished", format_time(job.finished_at)),
        ("attempts", f"{job.attempts} (worker {job.worker or '-'})"),
    ]
    lines = _key_values(details)
    # "" is how the wire says "the default" for the string fields (optimizer, loss ...).
    spec = sorted((key, "default" if value == "" else value) for key, value in job.spec.items())
    lines += ["", "hyperparameters:", *_key_values(spec, indent="  ")]
    if job.metrics:
        metrics = [(k, f"{v:.6g}") for k, v in sorted(job.metrics.items())]
        lines += ["", "metrics:", *_key_values(metrics, indent="  ")]
    if job.epochs:
        lines += ["", format_epochs(job)]
    return "\n".join(lines)


def _key_values(items: Sequence[tuple[str, Any]], indent: str = "") -> list[str]:
    width = max((len(key) for key, _ in items), default=0) + 1
    return [f"{indent}{key + ':':<{width}} {value}" for key, value in items]


def format_epochs(job: JobInfo) -> str:
    """The per-epoch table; the best epoch (lowest validation loss) is marked with `*`."""
    rows = [
        (
            f"{e.epoch}{'*' if e.epoch == job.best_epoch else ''}",
            _loss(e.train_loss),
            _loss(e.val_loss),
            "kept" if e.checkpoint else "-",
            format_time(e.finished_at),
        )
        for e in job.epochs
    ]
    return format_table(("EPOCH", "TRAIN LOSS", "VAL LOSS", "CHECKPOINT", "FINISHED"), rows)


def loss_series(job: JobInfo, events: Sequence[JobEventInfo]) -> Series:
    """Train loss by step from the progress events; validation loss at each epoch's last step."""
    train = [(float(e.step), e.loss) for e in events if e.kind == "progress" and e.loss is not None]
    last_step: dict[int, int] = {}
    for event in events:
        if event.kind in ("progress", "epoch") and event.step:
            last_step[event.epoch] = max(last_step.get(event.epoch, 0), event.step)
    val = [
        (float(last_step[e.epoch]), e.val_loss)
        for e in job.epochs
        if e.val_loss is not None and e.epoch in last_step
    ]
    series: Series = {}
    if train:
        series[TRAIN_LOSS] = train
    if val:
        series[VAL_LOSS] = val
    return series


def plot_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    width: int = 60,
    height: int = 12,
    *,
    x_label: str = "step",
) -> str:
    """Scatter the (x, y) series on a text grid with y labels, an x axis and a legend."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return "no loss values to plot yet"
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    if y_min == y_max:  # a flat curve: centre it instead of dividing by zero
        y_min, y_max = y_min - 0.5, y_max + 0.5
    x_span = (x_max - x_min) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for mark, values in zip(MARKS, series.values(), strict=False):
        for x, y in values:
            if math.isfinite(y):
                row = round((y_max - y) / (y_max - y_min) * (height - 1))
                grid[row][round((x - x_min) / x_span * (width - 1))] = mark
    labels = _y_labels(y_min, y_max, height)
    pad = " " * len(labels[0])
    lines = [f"{label} |{''.join(row)}".rstrip() for label, row in zip(labels, grid, strict=True)]
    left, right = f"{x_min:g}", f"{x_max:g}"
    lines.append(f"{pad} +{'-' * width}")
    lines.append(f"{pad}  {left}{right:>{width - len(left)}}  {x_label}")
    legend = "  ".join(f"{mark} {name}" for mark, name in zip(MARKS, series, strict=False))
    return "\n".join([*lines, f"{pad}  {legend}"])


def _y_labels(y_min: float, y_max: float, height: int) -> list[str]:
    """Right-aligned values for the top, middle and bottom rows; blanks for the others."""
    middle = height // 2
    values = {0: y_max, middle: y_max - (y_max - y_min) * middle / max(height - 1, 1)}
    values[height - 1] = y_min
    texts = [f"{values[row]:.4g}" if row in values else "" for row in range(height)]
    width = max(len(text) for text in texts)
    return [text.rjust(width) for text in texts]


def check_matplotlib() -> None:
    """Raise ValueError naming the extra to install when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(PLOT_NEEDS)


def write_plot_png(
    series: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str = ""
) -> None:
    """The same curves as a PNG, with matplotlib (imported here: an optional dependency)."""
    check_matplotlib()
    import matplotlib  # type: ignore[import-not-found, unused-ignore]  # optional extra

    matplotlib.use("Agg")  # no display needed: the CLI only writes files
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, values in series.items():
        style = "o-" if name == VAL_LOSS else "-"
        axes.plot([x for x, _ in values], [y for _, y in values], style, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_tensors(tensors: dict[str, dict[str, Any]]) -> str:
    """ "x float32[100, 4], y int64[100]"."""
    return ", ".join(
        f"{name} {info['dtype']}{list(info['shape'])}" for name, info in tensors.items()
    )


def dataset_row(dataset: DatasetInfo) -> list[Any]:
    """The `datasets list` cells of one dataset (see DATASET_HEADERS)."""
    return [
        dataset.name,
        format_tensors(dataset.tensors),
        human_bytes(dataset.size),
        dataset.digest[:12],
        format_time(dataset.created_at, seconds=False),
        dataset.description or "-",
    ]
