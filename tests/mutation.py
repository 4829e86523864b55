"""Mutation testing of the modules that carry guarantees, each against the fast tests that
guard it: `make mutants` (all of them) or `make mutants MODULE=server/security.py`.

The tool is cosmic-ray (pinned in the dev extra), driven through its library API: for each
module this script builds a cosmic-ray session under build/mutants/<module>/, skips the
mutants no test can see (inside type annotations; outside the functions a target names),
runs the mapped tests once unmutated (they must pass; their time sets the per-mutant
timeout), then applies one mutant at a time *in place* and runs the tests with
`-x -q -p no:cacheprovider`. A mutant whose tests fail is killed; one whose tests outlive the
timeout is killed by timeout; one whose tests pass survived. It prints a score table and
writes build/mutants/report.json (one entry per module, with the commit and the survivors).

In place means the file under test really is rewritten for each mutant, so the code that
Envoy's own Python process imports is mutated too (the editable install maps
moduleserve.X to the folder X/). The file is restored after every mutant; on Ctrl-C,
SIGTERM or SIGHUP (the test process group is killed first); and, should this process be
killed outright (SIGKILL), at the start of the next run (or `--restore`) from the copy kept
in build/mutants/backup/ for as long as a mutant may be on disk. Do not edit a module while
it is being mutated: its restore would undo the edit.

Not part of CI (.ci/run): a module takes minutes to tens of minutes. The table in
tests/README.md records the scores.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import datetime
import fcntl
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "mutants"
BACKUPS = OUT / "backup"
PYTEST = ("-x", "-q", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Target:
    """A module and the tests that guard it, fastest and most telling first (`-x` stops at
    the first failure, so a killed mutant costs only the tests up to the one that saw it)."""

    tests: tuple[str, ...]
    # fnmatch patterns of qualified names (`Class.method`); empty: the whole file.
    functions: tuple[str, ...] = ()
    # Its guarantees only show on PostgreSQL: warn when MODULESERVE_TEST_POSTGRES_URL is unset.
    postgres: bool = False
    # Extra pytest arguments (e.g. `-k envoy`).
    pytest_args: tuple[str, ...] = ()


INT = "tests/integration/"
UNIT = "tests/unit/"

# The modules that carry guarantees, each with the tests that guard it.
TARGETS: dict[str, Target] = {
    # Bearer tokens (admin and read), TLS credentials.
    "server/security.py": Target(
        (
            INT + "test_rest.py::test_bearer_token_for_load_and_unload",
            INT + "test_jobs_rpc.py::test_job_calls_need_the_admin_token_and_reads_need_a_read"
            "_token_when_set",
            INT + "test_front_ends.py::test_mutating_calls_need_a_token",
            INT + "test_front_ends.py::test_tls",
        )
    ),
    # Dynamic batching: queue limits, deadlines, cancellation, merging, splitting results.
    "server/engine/batcher.py": Target(
        (UNIT + "test_batcher.py", UNIT + "test_batcher_inline.py", UNIT + "test_input_plan.py")
    ),
    # gRPC over HTTP/2 under Envoy only: every test that reaches it runs an Envoy process.
    "server/frontends/grpc_codec.py": Target(
        (INT + "test_front_ends.py", INT + "test_wire.py", INT + "test_hostile_rpc.py"),
        pytest_args=("-k", "envoy"),
    ),
    # KServe V2 REST: routing, HTTP framing, JSON and binary-tensor decoding.
    "server/frontends/rest.py": Target(
        (UNIT + "test_rest_http.py", UNIT + "test_rest_infer.py", INT + "test_rest.py")
    ),
    "server/frontends/rest_http.py": Target(
        (UNIT + "test_rest_http.py", INT + "test_rest.py", INT + "test_rest_envoy.py")
    ),
    "server/frontends/rest_infer.py": Target((UNIT + "test_rest_infer.py", INT + "test_rest.py")),
    # Job claim (FOR UPDATE SKIP LOCKED on PostgreSQL), leases, fencing, succeed/cancel.
    "registry/jobs.py": Target((INT + "test_jobs_queue.py",), postgres=True),
    # Alias moves: compare-and-set, history, the move a finished job makes.
    "registry/checkpoints.py": Target(
        (
            INT + "test_registry.py::test_alias_compare_and_set_and_history",
            INT + "test_registry.py::test_racing_first_alias_sets_give_one_winner_and_conflicts",
            INT + "test_registry.py::test_bad_alias_names_are_refused",
            INT + "test_registry.py::test_delete_is_refused_while_an_alias_points_at_the_version",
            INT + "test_registry.py::test_empty_ref_resolves_to_default_alias_else_latest",
            INT + "test_jobs_queue.py::test_the_alias_moves_only_if_it_still_points_where_it_did",
            INT
            + "test_jobs_queue.py::test_a_job_runs_queued_running_succeeded_with_ordered_events",
        ),
        functions=(
            "Checkpoints.set_alias",
            "Checkpoints.unset_alias",
            "Checkpoints.move_alias_in",
            "Checkpoints._move_alias",
        ),
        postgres=True,
    ),
    # Safe loading: tensor files without pickle code (formats.py: safetensors, .npz, and
    # .pt/.pth through torchfiles.py), sizes checked before anything is read or inflated.
    "registry/formats.py": Target((INT + "test_hostile_files.py", INT + "test_registry.py")),
    "registry/torchfiles.py": Target((INT + "test_hostile_files.py", INT + "test_registry.py")),
    # Strict, dtype-faithful loading of a stored state_dict into a module.
    "registry/loading.py": Target((INT + "test_registry.py", INT + "test_hostile_files.py")),
}


# --------------------------------------------------------------------------- restoring


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every `finally` restores."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _backup_of(path: Path) -> Path:
    """build/mutants/backup/server/security.py.orig for server/security.py."""
    return BACKUPS / (str(path.resolve().relative_to(ROOT)) + ".orig")


def restore_leftovers() -> list[Path]:
    """Put back any module a killed run left mutated (its backup outlived the run)."""
    restored = []
    for backup in sorted(BACKUPS.rglob("*.orig")):
        path = ROOT / str(backup.relative_to(BACKUPS)).removesuffix(".orig")
        original = backup.read_bytes()
        if path.read_bytes() != original:
            # Keep what is replaced: the one case where it is not a mutant is an edit made
            # after a killed run that had already restored the file.
            backup.with_suffix(".replaced").write_bytes(path.read_bytes())
            path.write_bytes(original)
            _drop_bytecode(path)
            restored.append(path.relative_to(ROOT))
        backup.unlink()
    return restored


def _drop_bytecode(path: Path) -> None:
    """Remove the module's cached bytecode: a test process that wrote a mutant's .pyc in the
    same second as the restore (same size, same mtime) would otherwise serve it later."""
    for pyc in (path.parent / "__pycache__").glob(path.stem + ".*.pyc"):
        pyc.unlink(missing_ok=True)


def _adopt_orphans() -> None:
    """Become the subreaper of what the tests start (Linux): a process that outlives a
    killed test run (an Envoy, a worker) is reparented here, where _kill_children finds it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _kill_children() -> None:
    """Kill what this process started and that still runs: the test command runs in a
    session of its own (cosmic-ray kills its group on timeout, not on an interrupt)."""
    import psutil

    children = psutil.Process().children(recursive=True)  # listed before any dies
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


@contextlib.contextmanager
def guarded(path: Path) -> Iterator[None]:
    """While mutants of `path` are on disk: a backup exists, and any exit restores."""
    original = path.read_bytes()
    backup = _backup_of(path)
    backup.parent.mkdir(parents=True, exist_ok=True)  # before any mutant is written
    backup.write_bytes(original)
    try:
        yield
    finally:
        _kill_children()
        if path.read_bytes() != original:
            path.write_bytes(original)
        _drop_bytecode(path)
        backup.unlink()


@contextlib.contextmanager
def single_run() -> Iterator[None]:
    """One run at a time in a work tree: two would mutate and restore under each other."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit("another mutation run holds build/mutants/.lock in this work tree")
        yield


# --------------------------------------------------------------------------- selecting


def _char_col(lines: list[bytes], line: int, byte_col: int) -> int:
    """ast counts columns in UTF-8 bytes, cosmic-ray (parso) in characters."""
    return len(lines[line - 1][:byte_col].decode("utf-8", "replace"))


def _span(node: ast.AST, lines: list[bytes]) -> tuple[tuple[int, int], tuple[int, int]]:
    start = (node.lineno, _char_col(lines, node.lineno, node.col_offset))  # type: ignore[attr-defined]
    end_line: int = node.end_lineno  # type: ignore[attr-defined]
    return start, (end_line, _char_col(lines, end_line, node.end_col_offset))  # type: ignore[attr-defined]


def annotation_spans(tree: ast.Module, lines: list[bytes]) -> list[tuple[Any, Any]]:
    """Where type annotations are: mutating `str | None` into `str & None` changes nothing a
    test can see (unevaluated under `from __future__ import annotations`)."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            spans.append(_span(node.annotation, lines))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            spans.append(_span(node.returns, lines))
    return spans


def function_lines(tree: ast.Module, patterns: Sequence[str]) -> list[tuple[int, int]]:
    """Line ranges (decorators included) of the definitions whose qualified name matches."""
    ranges: list[tuple[int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    ranges.append((first, child.end_lineno or child.lineno))
                visit(child, name + ".")

    visit(tree, "")
    return ranges


# A selective set (negation and boundary for comparisons, one replacement per arithmetic or
# bitwise operator, one per number): cosmic-ray's full set replaces every `+` eleven ways and
# every `<` seven ways, which multiplies the run time and rarely kills anything the chosen
# one would not. `--all-operators` runs them all.
SELECTED = (
    {
        "ReplaceBinaryOperator_" + pair
        for pair in (
            *("Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Mul", "Mod_Mul", "Pow_Mul"),
            *("LShift_RShift", "RShift_LShift", "BitOr_BitAnd", "BitAnd_BitOr", "BitXor_BitOr"),
        )
    }
    | {
        "ReplaceComparisonOperator_" + pair
        for pair in (
            *("Eq_NotEq", "NotEq_Eq", "Is_IsNot", "IsNot_Is"),
            *("Lt_GtE", "Lt_LtE", "LtE_Gt", "LtE_Lt", "Gt_LtE", "Gt_GtE", "GtE_Lt", "GtE_Gt"),
        )
    }
    | {"ReplaceUnaryOperator_Delete_" + op for op in ("Not", "USub", "Invert")}
)
FAMILIES = ("ReplaceBinaryOperator_", "ReplaceComparisonOperator_", "ReplaceUnaryOperator_")


def skip_reason(
    mutation: Any,
    annotations: list[Any],
    ranges: list[tuple[int, int]] | None,
    all_operators: bool,
) -> str:
    start, end = tuple(mutation.start_pos), tuple(mutation.end_pos)
    operator = mutation.operator_name.removeprefix("core/")
    if any(a <= start and end <= b for a, b in annotations):
        return "in a type annotation"
    if ranges is not None and not any(a <= start[0] <= b for a, b in ranges):
        return "outside the functions named"
    if all_operators:
        return ""
    if operator.startswith(FAMILIES) and operator not in SELECTED:
        return "not in the selective set"
    # NumberReplacer yields +1 then -1 for each literal: keep +1 (`xs[0]` -> `xs[1]`; -1 would
    # make `xs[-1]`, the same element when there is one).
    if operator == "NumberReplacer" and mutation.occurrence % 2:
        return "not in the selective set"
    return ""


# --------------------------------------------------------------------------- running


def test_command(target: Target) -> list[str]:
    return [sys.executable, "-m", "pytest", *PYTEST, *target.pytest_args, *target.tests]


def init_session(
    module: str, target: Target, session: Path, all_operators: bool = False
) -> tuple[int, Counter[str]]:
    """A fresh cosmic-ray session, the mutants not to run marked skipped: (total, why skipped)."""
    import cosmic_ray.commands
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    path = Path(module)
    source = (ROOT / path).read_bytes()
    tree = ast.parse(source)
    lines = source.splitlines()
    annotations = annotation_spans(tree, lines)
    ranges = function_lines(tree, target.functions) if target.functions else None
    if ranges == []:
        sys.exit(f"{module}: no definition matches {', '.join(target.functions)}")
    session.unlink(missing_ok=True)
    with use_db(str(session), WorkDB.Mode.create) as db:
        cosmic_ray.commands.init([path], db, {})
        items = list(db.work_items)
        skipped: dict[str, list[str]] = {}
        for item in items:
            reason = skip_reason(item.mutations[0], annotations, ranges, all_operators)
            if reason:
                skipped.setdefault(reason, []).append(item.job_id)
        for reason, job_ids in skipped.items():
            result = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=reason)
            db.set_multiple_results(job_ids, result)
        return len(items), Counter({reason: len(ids) for reason, ids in skipped.items()})


def run_unmutated(command: list[str]) -> float:
    """The mapped tests on the code as it is: they must pass. Returns their wall time."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
        sys.exit("the mapped tests fail without any mutant: fix them first")
    return time.monotonic() - started


def outcome(result: Any) -> str:
    """killed | timeout | survived | incompetent | skipped (cosmic-ray's result, classified)."""
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    if result.worker_outcome == WorkerOutcome.SKIPPED:
        return "skipped"
    if result.worker_outcome != WorkerOutcome.NORMAL:
        return "incompetent"  # the mutation could not be applied or the runner failed
    if result.test_outcome == TestOutcome.SURVIVED:
        return "survived"
    if result.test_outcome == TestOutcome.KILLED:
        return "timeout" if result.output == "timeout" else "killed"
    return "incompetent"


def run_module(module: str, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db

    workdir = OUT / module.replace("/", "__").removesuffix(".py")
    workdir.mkdir(parents=True, exist_ok=True)
    session = workdir / "session.sqlite"
    command = test_command(target)
    postgres = bool(os.environ.get("MODULESERVE_TEST_POSTGRES_URL"))
    print(f"\n== {module}" + (f" ({', '.join(target.functions)})" if target.functions else ""))
    print("   tests:", shlex.join(command[3:]))
    if target.postgres and not postgres:
        print(
            "   SQLite only: set MODULESERVE_TEST_POSTGRES_URL, its guarantees show on PostgreSQL"
        )
    total, skipped = init_session(module, target, session, args.all_operators)
    print(
        f"   {total - skipped.total()} of {total} mutants to run; skipped: "
        + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    )
    baseline = run_unmutated(command)
    timeout = args.timeout or max(60.0, round(args.timeout_factor * baseline))
    print(f"   unmutated tests {baseline:.0f} s; timeout per mutant {timeout:.0f} s")
    started = time.monotonic()
    with use_db(str(session), WorkDB.Mode.open) as db, guarded(ROOT / module):
        pending = sorted(db.pending_work_items, key=lambda i: tuple(i.mutations[0].start_pos))
        pending = [] if args.dry_run else pending[: args.limit or None]
        for n, item in enumerate(pending, 1):
            mutation = item.mutations[0]
            began = time.monotonic()
            result = mutate_and_test(item.mutations, shlex.join(command), timeout)
            db.set_result(item.job_id, result)
            _kill_children()  # anything a timed-out test run left behind
            operator = mutation.operator_name.removeprefix("core/")
            print(
                f"   [{n}/{len(pending)}] {outcome(result):<11} line {mutation.start_pos[0]:<4} "
                f"{operator} ({time.monotonic() - began:.0f} s)",
                flush=True,
            )
        entry = summarize(module, target, db, postgres, args.all_operators)
    entry.update(
        baseline_s=round(baseline, 1),
        timeout_s=timeout,
        elapsed_s=round(time.monotonic() - started),
        partial=bool(args.limit or args.dry_run),
    )
    return entry


def summarize(
    module: str, target: Target, db: Any, postgres: bool, all_operators: bool
) -> dict[str, Any]:
    counts = dict.fromkeys(("killed", "timeout", "survived", "incompetent", "skipped"), 0)
    survivors = []
    for item, result in db.completed_work_items:
        kind = outcome(result)
        counts[kind] += 1
        if kind == "survived":
            m = item.mutations[0]
            survivors.append(
                {
                    "line": m.start_pos[0],
                    "operator": m.operator_name,
                    "occurrence": m.occurrence,
                    "function": m.definition_name,
                    "diff": result.diff,
                    "job_id": item.job_id,
                }
            )
    survivors.sort(key=lambda s: (s["line"], s["operator"]))
    tested = counts["killed"] + counts["timeout"] + counts["survived"]
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", module)),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "functions": list(target.functions),
        "operators": "all" if all_operators else "selective",
        "tests": list(target.tests),
        "pytest_args": list(target.pytest_args),
        "postgres": postgres,
        "mutants": tested,
        **counts,
        "score": round((counts["killed"] + counts["timeout"]) / tested, 3) if tested else None,
        "session": str(db.name()),
        "survivors": survivors,
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


# --------------------------------------------------------------------------- reporting


def print_table(report: dict[str, Any], modules: Sequence[str]) -> None:
    head = ("module", "mutants", "killed", "timeout", "survived", "incomp.", "skipped", "score")
    rows = []
    for module in modules:
        e = report[module]
        score = f"{100 * e['score']:.0f}%" if e["score"] is not None else "-"
        rows.append(
            (
                module + (" *" if e.get("functions") else ""),
                *(str(e[k]) for k in ("mutants", "killed", "timeout", "survived")),
                *(str(e[k]) for k in ("incompetent", "skipped")),
                score + (" (partial)" if e.get("partial") else ""),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if any(report[m].get("functions") for m in modules):
        print("* only the functions the target names")


def print_survivors(report: dict[str, Any], modules: Sequence[str]) -> None:
    for module in modules:
        for s in report[module]["survivors"]:
            print(f"\n-- {module}:{s['line']} {s['operator']} (in {s['function']})")
            print(
                "\n".join(
                    line
                    for line in s["diff"].splitlines()
                    if line[:1] in "+-" and line[:3] not in ("+++", "---")
                )
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="paths as in TARGETS (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mapping and exit")
    parser.add_argument("--restore", action="store_true", help="restore what a killed run left")
    parser.add_argument(
        "--report", action="store_true", help="print the table of the last runs; run nothing"
    )
    parser.add_argument("--survivors", action="store_true", help="with --report: their diffs")
    parser.add_argument(
        "--timeout", type=float, help="seconds per mutant (default: factor x unmutated)"
    )
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument(
        "--all-operators", action="store_true", help="cosmic-ray's full set, not the selective one"
    )
    parser.add_argument("--limit", type=int, help="run only the first N mutants (a smoke test)")
    parser.add_argument(
        "--dry-run", action="store_true", help="count mutants and time the tests; no report"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"not mapped: {', '.join(unknown)}; mapped: {', '.join(TARGETS)}")
    modules = args.modules or list(TARGETS)
    if args.list:
        for module in modules:
            print(
                module,
                *TARGETS[module].functions,
                "\n   ",
                shlex.join(test_command(TARGETS[module])[3:]),
            )
        return 0
    report_path = OUT / "report.json"
    report = json.loads(report_path.read_text())["modules"] if report_path.exists() else {}
    if args.report:
        modules = [m for m in modules if m in report]
        print_table(report, modules)
        if args.survivors:
            print_survivors(report, modules)
        return 0
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    os.chdir(ROOT)
    _adopt_orphans()
    with single_run():
        for path in restore_leftovers():
            print(
                f"restored {path}, left mutated by a killed run; what it held is in "
                f"{_backup_of(ROOT / path).with_suffix('.replaced').relative_to(ROOT)}"
            )
        if args.restore:
            return 0
        for module in modules:
            report[module] = run_module(module, TARGETS[module], args)
            if not args.dry_run:
                report_path.write_text(
                    json.dumps({"tool": _tool(), "modules": report}, indent=2) + "\n"
                )
    print()
    print_table(report, modules)
    if args.dry_run:
        return 0
    print(f"\nwritten: {report_path.relative_to(ROOT)}; the survivors' diffs:")
    print("   ", shlex.join(["python", "tests/mutation.py", "--report", "--survivors", *modules]))
    return 0


def _tool() -> str:
    from importlib.metadata import version

    return f"cosmic-ray {version('cosmic-ray')}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM/SIGHUP (Interrupted)
        sys.exit(f"\ninterrupted ({str(stop) or 'SIGINT'}): the module under test is restored")
