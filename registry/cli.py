"""`moduleserve-registry`: the registry admin CLI (a thin layer over registry.api)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moduleserve.client.tables import os_error_code, print_error, run_main
from moduleserve.client.version import version_text
from moduleserve.registry import errors
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import SPEC_DTYPES
from moduleserve.registry.commands import (
    cmd_alias_history,
    cmd_alias_set,
    cmd_alias_unset,
    cmd_classes_delete,
    cmd_classes_list,
    cmd_classes_register,
    cmd_classes_show,
    cmd_classes_update,
    cmd_datasets_list,
    cmd_datasets_push,
    cmd_datasets_show,
    cmd_delete,
    cmd_demo,
    cmd_export,
    cmd_gc,
    cmd_init,
    cmd_list,
    cmd_push,
    cmd_show,
    cmd_tag,
    cmd_verify,
)
from moduleserve.registry.config import RegistrySettings, with_added
from moduleserve.registry.errors import RegistryError
from moduleserve.registry.inspect_cli import add_inspect_command

Handler = Callable[[Registry, argparse.Namespace], int]
REF_HELP = "model name, then :VERSION or :ALIAS (default: the default alias, else the latest)"

# The status name of each registry error in JSON error objects: the one the server sends
# for it (server/status.py STATUS_FOR; a test keeps the two in step). Most specific first.
CODE_FOR: tuple[tuple[type[RegistryError], str], ...] = (
    (errors.NotFoundError, "NOT_FOUND"),
    (errors.AlreadyExistsError, "ALREADY_EXISTS"),
    (errors.InvalidInputError, "INVALID_ARGUMENT"),
    (errors.AliasConflictError, "ABORTED"),
    (errors.WriteConflictError, "ABORTED"),
    (errors.ConflictError, "FAILED_PRECONDITION"),
    (errors.StateDictMismatchError, "FAILED_PRECONDITION"),
    (errors.SchemaOutdatedError, "FAILED_PRECONDITION"),
    (errors.ClassNotAllowedError, "PERMISSION_DENIED"),
    (errors.IntegrityError, "DATA_LOSS"),
    (errors.RegistryUnavailableError, "UNAVAILABLE"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success, 1 on failure, 2 on usage errors, 141 when stdout closed."""
    return run_main(lambda: _run(argv))


def error_code(exc: Exception) -> str:
    """The status name of an expected failure, for JSON error objects."""
    if isinstance(exc, OSError):
        return os_error_code(exc)
    return next((code for cls, code in CODE_FOR if isinstance(exc, cls)), "UNKNOWN")


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        registry = Registry(_settings(args))
    except ValueError as exc:
        print_error(str(exc), "INVALID_ARGUMENT", as_json=args.json)
        return 2
    try:
        if args.func is not cmd_init:
            registry.check_schema()
        return int(args.func(registry, args))
    except BrokenPipeError:
        raise  # stdout's reader left (`| head`): run_main ends quietly
    except (RegistryError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print_error(str(exc), error_code(exc), as_json=args.json)
        return 1
    finally:
        registry.close()


def _settings(args: argparse.Namespace) -> RegistrySettings:
    overrides: dict[str, Any] = {}
    if args.db:
        overrides["db"] = args.db
    if args.store:
        overrides["store"] = Path(args.store)
    class_path = [Path(p) for p in args.class_path or ()]
    return with_added(RegistrySettings(**overrides), args.allow_prefix or (), class_path)


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one sub-command per registry operation."""
    parser = argparse.ArgumentParser(
        prog="moduleserve-registry", description="Administer a moduleserve registry."
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--db",
        help="database URL (env MODULESERVE_DB; default: sqlite file registry.db beside the store)",
    )
    parser.add_argument(
        "--store", help="blob store folder (env MODULESERVE_STORE; default ./data/store)"
    )
    parser.add_argument(
        "--allow-prefix",
        action="append",
        metavar="PACKAGE",
        help="package whose classes may be registered, besides moduleserve.registry.demo "
        "(repeatable; env MODULESERVE_ALLOWED_CLASS_PREFIXES as a JSON list)",
    )
    parser.add_argument(
        "--class-path",
        action="append",
        metavar="DIR",
        help="folder to import your classes' package from (repeatable; env "
        "MODULESERVE_CLASS_PATH as a JSON list)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON for scripts (also after the command)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    _command(commands, "init", cmd_init, "create or migrate the schema (safe to repeat)")
    _command(commands, "demo", cmd_demo, "register the demo classes and models (idempotent)")
    _add_class_commands(commands)
    _add_checkpoint_commands(commands)
    _add_alias_commands(commands)
    _add_maintenance_commands(commands)
    _add_dataset_commands(commands)
    add_inspect_command(commands)
    return parser


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Handler,
    help_text: str,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    # SUPPRESS: absent here leaves the global --json as it was.
    sub.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    sub.set_defaults(func=func)
    return sub


def _add_class_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    classes = commands.add_parser("classes", help="Module class catalog").add_subparsers(
        required=True, metavar="COMMAND"
    )
    register = _command(classes, "register", cmd_classes_register, "register a Module class")
    register.add_argument("name", help="the class's name in the catalog, used by push --class")
    register.add_argument(
        "import_path", metavar="package.module:Class", help="where to import the class from"
    )
    register.add_argument("--kwargs", default="{}", help="constructor kwargs as JSON")
    register.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="NAME:DTYPE:SHAPE",
        help=f"forward() input, e.g. x:float32:-1,3,8,8: -1 first for the batch dimension, "
        f"dtype one of {', '.join(SPEC_DTYPES)} (repeat per input)",
    )
    register.add_argument(
        "--output",
        action="append",
        metavar="NAME:DTYPE:SHAPE",
        help="name what forward() returns, in order, e.g. logits:float32:-1,10 (checked "
        "against it; default output0, output1, ...)",
    )
    register.add_argument("--description", default="")
    update = _command(
        classes,
        "update",
        cmd_classes_update,
        "change a class's inputs, outputs or description; a new spec must run on every "
        "stored version's weights",
    )
    update.add_argument("name", help="a registered class name")
    update.add_argument("--input", action="append", metavar="NAME:DTYPE:SHAPE", help="as register")
    update.add_argument("--output", action="append", metavar="NAME:DTYPE:SHAPE", help="as register")
    update.add_argument("--description")
    _command(
        classes, "delete", cmd_classes_delete, "remove a class no stored version uses"
    ).add_argument("name", help="a registered class name")
    _command(classes, "list", cmd_classes_list, "list registered classes")
    _command(classes, "show", cmd_classes_show, "show one class").add_argument(
        "name", help="a registered class name"
    )


def _add_checkpoint_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = _command(commands, "push", cmd_push, "push a checkpoint as a new version")
    push.add_argument("model", help="model name (created on its first push)")
    push.add_argument(
        "file", help=".safetensors, .npz, or .pt/.pth from torch.save(model.state_dict())"
    )
    push.add_argument("--class", dest="class_name", help="class name (required on first push)")
    push.add_argument("--alias", help="point this alias at the new version")
    push.add_argument("--tag", action="append", metavar="KEY=VALUE")
    push.add_argument("--description", default="")
    push.add_argument("--parent", type=int, help="version this one was derived from")
    push.add_argument(
        "--key",
        metavar="NAME",
        help="take the state_dict stored under NAME in a dict checkpoint, e.g. --key model "
        "for torch.save({'model': model.state_dict(), 'optimizer': ...})",
    )
    listing = _command(commands, "list", cmd_list, "list models, or one model's versions")
    listing.add_argument("model", nargs="?", help="list this model's versions")
    _command(commands, "show", cmd_show, "show a version").add_argument(
        "ref", metavar="MODEL[:VERSION|:ALIAS]", help=REF_HELP
    )
    tag = _command(commands, "tag", cmd_tag, "set or remove tags on a version")
    tag.add_argument("ref", metavar="MODEL[:VERSION|:ALIAS]", help=REF_HELP)
    tag.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="tags to set")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY")
    delete = _command(commands, "delete", cmd_delete, "delete a version")
    delete.add_argument("ref", metavar="MODEL:VERSION", help="the version to delete")
    delete.add_argument("--force", action="store_true", help="also remove aliases pointing at it")
    export = _command(commands, "export", cmd_export, "write a version to .pth or .safetensors")
    export.add_argument("ref", metavar="MODEL[:VERSION|:ALIAS]", help=REF_HELP)
    export.add_argument("file", help="output .pth or .safetensors (the suffix picks)")


def _add_alias_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alias = commands.add_parser("alias", help="move, remove and audit aliases").add_subparsers(
        required=True, metavar="COMMAND"
    )
    set_ = _command(alias, "set", cmd_alias_set, "point an alias at a version")
    set_.add_argument("model", help="model name")
    set_.add_argument("alias", help="alias name, e.g. production")
    set_.add_argument("version", help="version number the alias points at")
    unset = _command(alias, "unset", cmd_alias_unset, "remove an alias")
    unset.add_argument("model", help="model name")
    unset.add_argument("alias", help="alias name")
    for sub in (set_, unset):
        sub.add_argument(
            "--expect",
            metavar="VERSION|none",
            help="only if the alias still points at VERSION (none: unset)",
        )
    history = _command(alias, "history", cmd_alias_history, "show alias moves")
    history.add_argument("model", help="model name")
    history.add_argument("alias", nargs="?", help="only this alias's moves")


def _add_maintenance_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    _command(commands, "verify", cmd_verify, "re-hash every blob; exit 1 on any problem")
    gc = _command(commands, "gc", cmd_gc, "remove blobs nothing refers to")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep blobs younger than this (a push may be in flight; default 3600)",
    )


def _add_dataset_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    datasets = commands.add_parser("datasets", help="fine-tuning datasets").add_subparsers(
        required=True, metavar="COMMAND"
    )
    push = _command(datasets, "push", cmd_datasets_push, "push named tensors as a dataset")
    push.add_argument("name", help="dataset name, used by finetune --dataset")
    push.add_argument("file", help=".safetensors, .pt or .npz with tensors such as inputs, targets")
    push.add_argument("--description", default="")
    _command(datasets, "list", cmd_datasets_list, "list datasets")
    _command(datasets, "show", cmd_datasets_show, "show a dataset").add_argument(
        "name", help="dataset name"
    )
