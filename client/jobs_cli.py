"""`moduleserve finetune`, `moduleserve jobs ...` and `moduleserve datasets ...`.

Following a job replays its stored events, then streams new ones: a progress line redrawn
in place on a terminal, one line per event otherwise (pipes, tests), one JSON object per
line under `--json`. Ctrl-C detaches without cancelling the job; a broken stream (server
restarted) is resumed after the last event seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import ModuleServeError
from moduleserve.client.jobs import (
    FINISHED_STATES,
    STATES_BY_NAME,
    JobEventInfo,
    JobInfo,
    JobsClient,
)
from moduleserve.client.jobs_render import (
    DATASET_HEADERS,
    JOB_HEADERS,
    check_matplotlib,
    dataset_row,
    format_event,
    format_job,
    format_progress,
    format_queued,
    format_summary,
    format_tensors,
    job_row,
    loss_series,
    plot_curves,
    write_plot_png,
)
from moduleserve.client.refs import split_ref
from moduleserve.client.tables import format_table, human_bytes, to_json

Handler = Callable[[argparse.Namespace], int]

# flag, JobSpec field, type, choices, help. Flags left out leave the server's defaults.
HYPERPARAMETER_OPTIONS: tuple[tuple[str, str, type, tuple[str, ...] | None, str], ...] = (
    ("--epochs", "epochs", int, None, "passes over the training data (1)"),
    ("--lr", "learning_rate", float, None, "learning rate (1e-3)"),
    ("--batch-size", "batch_size", int, None, "examples per step (32)"),
    ("--optimizer", "optimizer", str, ("sgd", "adam", "adamw"), "optimizer (adamw)"),
    ("--loss", "loss", str, ("cross_entropy", "mse", "l1"), "loss (cross_entropy)"),
    ("--weight-decay", "weight_decay", float, None, "weight decay (0)"),
    ("--momentum", "momentum", float, None, "SGD momentum (0)"),
    ("--grad-clip", "grad_clip_norm", float, None, "clip the gradients' L2 norm (0: off)"),
    ("--schedule", "schedule", str, ("constant", "cosine"), "learning rate schedule"),
    ("--warmup-steps", "warmup_steps", int, None, "linear warm-up steps (0)"),
    ("--max-steps", "max_steps", int, None, "stop after this many steps (0: all epochs)"),
    ("--seed", "seed", int, None, "seed of shuffling, dropout and the split (0)"),
    ("--val-split", "val_split", float, None, "fraction held out for validation (0)"),
    ("--early-stopping", "early_stopping_patience", int, None, "patience in epochs (0: off)"),
    ("--precision", "precision", str, ("fp32", "bf16", "fp16"), "training precision (fp32)"),
    ("--log-every", "log_every_steps", int, None, "a progress event every N steps (10)"),
)
# Codes a restarted or briefly unreachable server gives a stream: worth reconnecting.
RECONNECT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
DETACHED = (
    "detached: job {id} keeps running; 'moduleserve jobs watch {id}' follows it again, "
    "'moduleserve jobs cancel {id}' stops it"
)
EXIT_INTERRUPTED = 130
JOB_HELP = "job id, as finetune and jobs list print it"


def add_jobs_commands(commands: Any) -> None:
    """Register `finetune`, `jobs` and `datasets` on the `moduleserve` sub-command parsers."""
    _add_finetune(commands)
    _add_jobs(commands)
    _add_datasets(commands)


def _leaf(group: Any, name: str, func: Handler, text: str) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = group.add_parser(name, help=text, description=text)
    # SUPPRESS: absent here leaves the global --json as it was.
    sub.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    sub.set_defaults(func=func)
    return sub


def _add_finetune(commands: Any) -> None:
    finetune = _leaf(commands, "finetune", cmd_finetune, "fine-tune a model version on a dataset")
    finetune.add_argument(
        "model", metavar="MODEL[:VERSION|:ALIAS]", help="the version to start from"
    )
    finetune.add_argument("--dataset", required=True, metavar="NAME", help="registered dataset")
    for flag, dest, kind, choices, text in HYPERPARAMETER_OPTIONS:
        metavar = None if choices else {int: "N", float: "X"}.get(kind)
        finetune.add_argument(
            flag, dest=dest, type=kind, choices=choices, metavar=metavar, help=text
        )
    finetune.add_argument(
        "--freeze", action="append", metavar="GLOB", help="freeze matching parameters (repeatable)"
    )
    finetune.add_argument("--alias", default="", help="move this alias to the result")
    finetune.add_argument("--detach", action="store_true", help="queue the job and return")


def _add_jobs(commands: Any) -> None:
    text = "list, show, follow, cancel and promote fine-tuning jobs"
    group = commands.add_parser("jobs", help=text, description=text)
    jobs = group.add_subparsers(required=True, metavar="COMMAND")
    listing = _leaf(jobs, "list", cmd_jobs_list, "jobs, newest first")
    listing.add_argument("--model", default="", help="only this model's jobs")
    listing.add_argument("--state", action="append", choices=sorted(STATES_BY_NAME), default=[])
    listing.add_argument("--limit", type=int, default=0, help="at most N (server default 100)")
    show = _leaf(jobs, "show", cmd_jobs_show, "a job's details, epochs and loss curves")
    show.add_argument("job", help=JOB_HELP)
    show.add_argument("--plot", type=Path, metavar="FILE.png", help="also write the curves")
    _leaf(jobs, "watch", cmd_jobs_watch, "follow a job until it ends").add_argument(
        "job", help=JOB_HELP
    )
    _leaf(jobs, "cancel", cmd_jobs_cancel, "ask a job to stop").add_argument("job", help=JOB_HELP)
    _leaf(jobs, "logs", cmd_jobs_logs, "every stored event of a job").add_argument(
        "job", help=JOB_HELP
    )
    promote = _leaf(jobs, "promote", cmd_jobs_promote, "register a kept epoch's checkpoint")
    promote.add_argument("job", help=JOB_HELP)
    promote.add_argument("--epoch", type=int, default=0, help="default: best, else last")
    promote.add_argument("--alias", default="", help="point this alias at the new version")


def _add_datasets(commands: Any) -> None:
    text = "upload and list fine-tuning datasets"
    group = commands.add_parser("datasets", help=text, description=text)
    datasets = group.add_subparsers(required=True, metavar="COMMAND")
    upload = _leaf(datasets, "upload", cmd_datasets_upload, "upload named tensors as a dataset")
    upload.add_argument("name", help="the dataset's name, used by finetune --dataset")
    upload.add_argument("file", type=Path, metavar="FILE", help=".npz (named) or .npy (one)")
    upload.add_argument("--description", default="")
    _leaf(datasets, "list", cmd_datasets_list, "every registered dataset")


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[JobsClient]:
    """A jobs client for the global --target/--token/--timeout options."""
    with ModelClient(args.target, token=args.token, timeout=args.timeout) as client:
        yield client.jobs


def _one_line_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# -- following a job -------------------------------------------------------------------------


class EventPrinter:
    """Shows followed events: JSON lines, a redrawn progress line on a terminal, or log lines."""

    def __init__(self, stream: TextIO, *, tty: bool, as_json: bool) -> None:
        self.stream, self.tty, self.as_json = stream, tty, as_json
        self._open_line = False  # a progress line is drawn without its newline
        self._val_loss: float | None = None  # progress events carry none: the last epoch's

    def show(self, event: JobEventInfo) -> None:
        """Print one event in this printer's form."""
        if event.kind == "epoch" and event.val_loss is not None:
            self._val_loss = event.val_loss
        if self.as_json:
            self._write(_one_line_json(event.to_dict()) + "\n")
        elif self.tty and event.kind == "progress":
            line = format_progress(event, self._val_loss)[: shutil.get_terminal_size().columns - 1]
            self._write(f"\r{line}\x1b[K")  # \x1b[K erases what a longer line left
            self._open_line = True
        else:
            self.end_line()
            self._write(format_event(event) + "\n")

    def end_line(self) -> None:
        """Finish a progress line left open, so that the next output starts on its own line."""
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()  # pipes are block-buffered: show each event as it comes


def follow(
    jobs: JobsClient,
    job_id: str,
    on_event: Callable[[JobEventInfo], None],
    *,
    delays: Sequence[float] = RECONNECT_DELAYS,
    sleep: Callable[[float], None] = time.sleep,
) -> JobInfo:
    """Replay and stream a job's events into `on_event` until it ends; returns the job then.

    A stream that broke after some events is resumed after the last one seen, waiting `delays`
    between tries (the count restarts whenever an event arrives). Once they run out the last
    error is raised, or the unfinished job is returned when the server kept ending the stream.
    """
    last_seq, failures = 0, 0
    while True:
        try:
            with closing(jobs.watch(job_id, after_seq=last_seq)) as events:
                for event in events:
                    on_event(event)
                    last_seq, failures = event.seq, 0
            job = jobs.get(job_id)
            if job.state in FINISHED_STATES or failures >= len(delays):
                return job
        except ModuleServeError as exc:
            # Before any event, the server was never reached: say so now instead of retrying.
            if not last_seq or exc.code not in RECONNECT_CODES or failures >= len(delays):
                raise
        sleep(delays[failures])
        failures += 1


def follow_and_report(jobs: JobsClient, job_id: str, args: argparse.Namespace) -> int:
    """Follow a job on stdout, then print its summary: 0 when it succeeded, 130 on Ctrl-C."""
    printer = EventPrinter(sys.stdout, tty=sys.stdout.isatty(), as_json=args.json)
    try:
        job = follow(jobs, job_id, printer.show)
    except KeyboardInterrupt:
        # Closing the stream (in `follow`) cancelled only the watch, never the job.
        printer.end_line()
        print(DETACHED.format(id=job_id), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        printer.end_line()
    print(_one_line_json(job.to_dict()) if args.json else format_summary(job))
    return 0 if job.state == "succeeded" else 1


# -- commands -------------------------------------------------------------------------------


def cmd_finetune(args: argparse.Namespace) -> int:
    """Queue a job with the hyperparameters given, then follow it unless --detach."""
    model, version = split_ref(args.model)
    given = {dest: getattr(args, dest) for _, dest, *_ in HYPERPARAMETER_OPTIONS}
    given["freeze"] = args.freeze
    hyperparameters = {name: value for name, value in given.items() if value is not None}
    with _session(args) as jobs:
        job = jobs.create(model, version, dataset=args.dataset, alias=args.alias, **hyperparameters)
        if args.json and args.detach:
            print(to_json(job.to_dict()))
        elif not args.json:
            print(format_queued(job))
        if args.detach:
            return 0
        return follow_and_report(jobs, job.id, args)


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    """Follow a job until it ends."""
    with _session(args) as jobs:
        return follow_and_report(jobs, args.job, args)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """Jobs as a table, newest first."""
    with _session(args) as jobs:
        found = jobs.list(args.model, states=args.state, limit=args.limit)
    if args.json:
        print(to_json([job.to_dict() for job in found]))
    else:
        print(format_table(JOB_HEADERS, [job_row(job) for job in found]) if found else "no jobs")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    """A job's details, epochs and loss curves (optionally also as a PNG)."""
    if args.plot is not None:
        check_matplotlib()  # before any call: fail fast
    with _session(args) as jobs:
        job = jobs.get(args.job)
        series = loss_series(job, jobs.events(args.job))
    if args.plot is not None:
        write_plot_png(series, args.plot, title=f"job {job.id} ({job.model}:{job.base_version})")
    if args.json:
        print(to_json({"job": job.to_dict(), "curves": series}))
        return 0
    print(format_job(job))
    if series:
        print(f"\nloss by step:\n{plot_curves(series)}")
    if args.plot is not None:
        print(f"wrote {args.plot}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    """Ask a job to stop and print its state after the request."""
    with _session(args) as jobs:
        job = jobs.cancel(args.job)
    if args.json:
        print(to_json(job.to_dict()))
    elif job.state in FINISHED_STATES:
        print(f"job {job.id} {job.state}")
    else:
        print(f"job {job.id} {job.state}, cancel requested: it stops within a few seconds")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    """Every stored event of a job, one line each."""
    with _session(args) as jobs:
        events = jobs.events(args.job)
    if args.json:
        print(to_json([event.to_dict() for event in events]))
    else:
        for event in events:
            print(format_event(event))
    return 0


def cmd_jobs_promote(args: argparse.Namespace) -> int:
    """Register the checkpoint a job kept at one epoch as a new version."""
    with _session(args) as jobs:
        model, version, epoch = jobs.promote(args.job, epoch=args.epoch, alias=args.alias)
    if args.json:
        data = {"model": model, "version": version, "job": args.job, "epoch": epoch}
        print(to_json({**data, "alias": args.alias}))
        return 0
    alias = f" and pointed alias {args.alias} at it" if args.alias else ""
    print(f"registered {model}:{version} from job {args.job} epoch {epoch}{alias}")
    return 0


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    """Upload a .npz (named arrays) or .npy (one array named after the file) as a dataset."""
    tensors = load_tensor_file(args.file)
    with _session(args) as jobs:
        dataset = jobs.upload_dataset(args.name, tensors, args.description)
    if args.json:
        print(to_json(dataset.to_dict()))
    else:
        size = human_bytes(dataset.size)
        summary = format_tensors(dataset.tensors)
        print(f"dataset {dataset.name}: {summary} ({size}, sha256:{dataset.digest[:12]})")
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    """Every registered dataset as a table."""
    with _session(args) as jobs:
        found = jobs.datasets()
    if args.json:
        print(to_json([dataset.to_dict() for dataset in found]))
    else:
        rows = [dataset_row(d) for d in found]
        print(format_table(DATASET_HEADERS, rows) if rows else "no datasets")
    return 0


def load_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """Arrays by name from a .npz, or a .npy as one array named after the file's stem."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if suffix == ".npy":
        # Memory-mapped: the upload reads it chunk by chunk instead of loading it whole.
        return {path.stem: np.load(path, mmap_mode="r", allow_pickle=False)}
    raise ValueError(f"cannot read {path.name}: use .npz (named arrays) or .npy (one array)")
