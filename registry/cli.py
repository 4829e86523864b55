"""`moduleserve-registry`: the registry admin CLI (a thin layer over registry.api)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.tables import format_table, human_bytes, to_json
from registry.api import Registry
from registry.checkpoints import UNSET
from registry.classes import parse_input_spec
from registry.config import RegistrySettings
from registry.demo.seed import seed_demo
from registry.entities import ModuleClass
from registry.errors import InvalidInputError, RegistryError
from registry.inspect_cli import add_inspect_command
from registry.names import parse_version, split_ref

Handler = Callable[[Registry, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 1 on failure, 2 on usage errors."""
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.func is not cmd_init:
            registry.check_schema()
        return int(args.func(registry, args))
    except (RegistryError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()


def _settings(args: argparse.Namespace) -> RegistrySettings:
    overrides: dict[str, Any] = {}
    if args.db:
        overrides["db"] = args.db
    if args.store:
        overrides["store"] = Path(args.store)
    if args.allow_prefix:
        overrides["allowed_class_prefixes"] = args.allow_prefix
    return RegistrySettings(**overrides)


def _actor() -> str:
    try:
        return f"moduleserve-registry ({getpass.getuser()})"
    except (KeyError, OSError):
        return "moduleserve-registry"


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(to_json(data) if args.json else text)


# -- commands ------------------------------------------------------------------------------


def cmd_init(registry: Registry, args: argparse.Namespace) -> int:
    """Create or migrate the schema."""
    before, after = registry.init()
    state = "already at" if before == after else f"migrated from {before or 'empty'} to"
    _emit(args, {"before": before, "after": after}, f"registry schema {state} {after}")
    return 0


def cmd_demo(registry: Registry, args: argparse.Namespace) -> int:
    """Seed the demo models (idempotent)."""
    pushed = seed_demo(registry)
    text = "\n".join(f"pushed {v.model}:{v.version} ({v.class_name})" for v in pushed)
    _emit(args, [v.to_dict() for v in pushed], text or "demo models already present")
    return 0


def cmd_classes_register(registry: Registry, args: argparse.Namespace) -> int:
    """Register a Module class."""
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise InvalidInputError("--kwargs must be a JSON object, e.g. '{\"hidden\": 64}'")
    specs = [parse_input_spec(text) for text in args.input]
    module_class = registry.classes.register(
        args.name, args.import_path, kwargs, specs, args.description
    )
    _emit(args, _class_dict(module_class), f"registered class {module_class.name}")
    return 0


def cmd_classes_list(registry: Registry, args: argparse.Namespace) -> int:
    """List registered classes."""
    classes = registry.classes.list()
    rows = [(c.name, c.import_path, json.dumps(c.kwargs), _specs(c.inputs)) for c in classes]
    _emit(
        args,
        [_class_dict(c) for c in classes],
        format_table(("CLASS", "IMPORT PATH", "KWARGS", "INPUTS"), rows),
    )
    return 0


def cmd_classes_show(registry: Registry, args: argparse.Namespace) -> int:
    """Show one class."""
    c = registry.classes.get(args.name)
    text = "\n".join(
        [
            f"class:       {c.name}",
            f"import path: {c.import_path}",
            f"kwargs:      {json.dumps(c.kwargs)}",
            f"inputs:      {_specs(c.inputs)}",
            f"outputs:     {_specs(c.outputs)}",
            f"description: {c.description}",
            f"created:     {c.created_at:%Y-%m-%d %H:%M:%S} UTC",
        ]
    )
    _emit(args, _class_dict(c), text)
    return 0


def cmd_push(registry: Registry, args: argparse.Namespace) -> int:
    """Push a checkpoint file as a new version."""
    version = registry.push_file(
        args.model,
        Path(args.file),
        class_name=args.class_name,
        alias=args.alias,
        tags=_pairs(args.tag),
        description=args.description,
        parent=args.parent,
        actor=_actor(),
    )
    _emit(args, version.to_dict(), f"{version.model}:{version.version}")
    return 0


def cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    """List models, or one model's versions."""
    if args.model:
        versions = registry.checkpoints.list_versions(args.model)
        rows = [
            (
                v.version,
                ",".join(v.aliases),
                v.parent_version,
                v.source,
                human_bytes(v.size),
                v.digest[:12],
                f"{v.created_at:%Y-%m-%d %H:%M}",
            )
            for v in versions
        ]
        headers = ("VERSION", "ALIASES", "PARENT", "SOURCE", "SIZE", "DIGEST", "CREATED")
        _emit(args, [v.to_dict() for v in versions], format_table(headers, rows))
        return 0
    models = registry.checkpoints.list_models()
    rows = [
        (
            m.name,
            m.class_name,
            len(m.versions),
            m.latest,
            ", ".join(f"{a}={v}" for a, v in m.aliases.items()),
        )
        for m in models
    ]
    data = [
        {"name": m.name, "class": m.class_name, "versions": list(m.versions), "aliases": m.aliases}
        for m in models
    ]
    _emit(args, data, format_table(("MODEL", "CLASS", "VERSIONS", "LATEST", "ALIASES"), rows))
    return 0


def cmd_show(registry: Registry, args: argparse.Namespace) -> int:
    """Show one version."""
    model, ref = split_ref(args.ref)
    v = registry.checkpoints.resolve(model, ref)
    text = "\n".join(
        [
            f"model:       {v.model}",
            f"version:     {v.version}",
            f"class:       {v.class_name}",
            f"aliases:     {', '.join(v.aliases) or '-'}",
            f"digest:      sha256:{v.digest}",
            f"size:        {human_bytes(v.size)} ({v.size} bytes)",
            f"parent:      {v.parent_version or '-'}",
            f"source:      {v.source}",
            f"tags:        {json.dumps(v.tags)}",
            f"metrics:     {json.dumps(v.metrics)}",
            f"description: {v.description}",
            f"created:     {v.created_at:%Y-%m-%d %H:%M:%S} UTC",
        ]
    )
    _emit(args, v.to_dict(), text)
    return 0


def cmd_alias_set(registry: Registry, args: argparse.Namespace) -> int:
    """Point an alias at a version (compare-and-set with --expect)."""
    event = registry.checkpoints.set_alias(
        args.model,
        args.alias,
        parse_version(args.version),
        expect=_expect(args.expect),
        actor=_actor(),
    )
    _emit(
        args,
        vars(event),
        f"{args.model}:{args.alias} -> {event.to_version} (was {event.from_version or '-'})",
    )
    return 0


def cmd_alias_unset(registry: Registry, args: argparse.Namespace) -> int:
    """Remove an alias."""
    event = registry.checkpoints.unset_alias(
        args.model, args.alias, expect=_expect(args.expect), actor=_actor()
    )
    _emit(args, vars(event), f"{args.model}:{args.alias} removed (was {event.from_version})")
    return 0


def cmd_alias_history(registry: Registry, args: argparse.Namespace) -> int:
    """Show alias moves."""
    events = registry.checkpoints.alias_history(args.model, args.alias)
    rows = [
        (f"{e.at:%Y-%m-%d %H:%M:%S}", e.alias, e.from_version or "-", e.to_version or "-", e.actor)
        for e in events
    ]
    _emit(
        args,
        [vars(e) for e in events],
        format_table(("WHEN (UTC)", "ALIAS", "FROM", "TO", "BY"), rows),
    )
    return 0


def cmd_tag(registry: Registry, args: argparse.Namespace) -> int:
    """Set or remove tags on a version."""
    model, ref = split_ref(args.ref)
    version = registry.checkpoints.tag(model, ref, _pairs(args.pairs), args.remove)
    _emit(args, version.to_dict(), f"{model}:{version.version} tags {json.dumps(version.tags)}")
    return 0


def cmd_delete(registry: Registry, args: argparse.Namespace) -> int:
    """Delete a version."""
    model, ref = split_ref(args.ref)
    if not ref.isdigit():
        raise InvalidInputError("delete needs an explicit version number: MODEL:VERSION")
    version = registry.checkpoints.delete(model, int(ref), force=args.force, actor=_actor())
    _emit(
        args,
        version.to_dict(),
        f"deleted {model}:{version.version} "
        "(run `moduleserve-registry gc` to free its blob once nothing uses it)",
    )
    return 0


def cmd_export(registry: Registry, args: argparse.Namespace) -> int:
    """Export a version to .pth or .safetensors."""
    model, ref = split_ref(args.ref)
    version = registry.export(model, ref, Path(args.file))
    _emit(
        args,
        {"file": args.file, **version.to_dict()},
        f"wrote {model}:{version.version} to {args.file}",
    )
    return 0


def cmd_verify(registry: Registry, args: argparse.Namespace) -> int:
    """Re-hash every blob; exit 1 if any is missing or corrupt."""
    problems = registry.verify()
    checked = len(registry.referenced_digests())
    rows = [(p.digest[:12], p.problem, ", ".join(p.referenced_by)) for p in problems]
    text = (
        format_table(("DIGEST", "PROBLEM", "USED BY"), rows)
        if problems
        else f"all {checked} blobs intact"
    )
    _emit(args, {"checked": checked, "problems": [vars(p) for p in problems]}, text)
    return 1 if problems else 0


def cmd_gc(registry: Registry, args: argparse.Namespace) -> int:
    """Remove unreferenced blobs."""
    report = registry.gc(dry_run=args.dry_run, min_age_s=args.min_age)
    verb = "would remove" if report.dry_run else "removed"
    _emit(
        args,
        vars(report),
        f"{verb} {len(report.digests)} blob(s), "
        f"{human_bytes(report.bytes_freed)}, and {len(report.temp_files)} temporary file(s)",
    )
    return 0


def cmd_datasets_push(registry: Registry, args: argparse.Namespace) -> int:
    """Push a dataset file."""
    dataset = registry.push_dataset_file(args.name, Path(args.file), args.description)
    _emit(args, vars(dataset), f"dataset {dataset.name}: {_tensor_summary(dataset.tensors)}")
    return 0


def cmd_datasets_list(registry: Registry, args: argparse.Namespace) -> int:
    """List datasets."""
    datasets = registry.datasets.list()
    rows = [
        (d.name, _tensor_summary(d.tensors), human_bytes(d.size), d.digest[:12]) for d in datasets
    ]
    _emit(
        args,
        [vars(d) for d in datasets],
        format_table(("DATASET", "TENSORS", "SIZE", "DIGEST"), rows),
    )
    return 0


def cmd_datasets_show(registry: Registry, args: argparse.Namespace) -> int:
    """Show one dataset."""
    d = registry.datasets.get(args.name)
    rows = [(name, info["dtype"], info["shape"]) for name, info in d.tensors.items()]
    text = f"dataset {d.name} (sha256:{d.digest}, {human_bytes(d.size)})\n" + format_table(
        ("TENSOR", "DTYPE", "SHAPE"), rows
    )
    _emit(args, vars(d), text)
    return 0


# -- helpers -------------------------------------------------------------------------------


def _expect(text: str | None) -> int | object | None:
    if text is None:
        return UNSET
    return None if text.lower() == "none" else parse_version(text)


def _pairs(items: Sequence[str] | None) -> dict[str, str]:
    result = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"tag {item!r} is not key=value")
        result[key] = value
    return result


def _specs(specs: Sequence[Any]) -> str:
    return ", ".join(f"{s.name}:{s.dtype}:{list(s.shape)}" for s in specs)


def _class_dict(c: ModuleClass) -> dict[str, Any]:
    return {
        "name": c.name,
        "import_path": c.import_path,
        "kwargs": c.kwargs,
        "inputs": [s.to_dict() for s in c.inputs],
        "outputs": [s.to_dict() for s in c.outputs],
        "description": c.description,
        "created_at": c.created_at.isoformat(),
    }


def _tensor_summary(tensors: dict[str, Any]) -> str:
    return ", ".join(f"{n} {i['dtype']}{i['shape']}" for n, i in tensors.items())


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one sub-command per registry operation."""
    parser = argparse.ArgumentParser(
        prog="moduleserve-registry", description="Administer a moduleserve registry."
    )
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
        help="package whose classes may be registered (repeatable; env "
        "MODULESERVE_ALLOWED_CLASS_PREFIXES as a JSON list)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
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


def _command(commands: Any, name: str, func: Handler, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(func=func)
    return sub


def _add_class_commands(commands: Any) -> None:
    classes = commands.add_parser("classes", help="Module class catalog").add_subparsers(
        required=True, metavar="COMMAND"
    )
    register = _command(classes, "register", cmd_classes_register, "register a Module class")
    register.add_argument("name")
    register.add_argument("import_path", metavar="package.module:Class")
    register.add_argument("--kwargs", default="{}", help="constructor kwargs as JSON")
    register.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="NAME:DTYPE:SHAPE",
        help="forward() input, e.g. x:float32:-1,3,8,8 (repeat per input)",
    )
    register.add_argument("--description", default="")
    _command(classes, "list", cmd_classes_list, "list registered classes")
    _command(classes, "show", cmd_classes_show, "show one class").add_argument("name")


def _add_checkpoint_commands(commands: Any) -> None:
    push = _command(commands, "push", cmd_push, "push a checkpoint as a new version")
    push.add_argument("model")
    push.add_argument("file", help=".safetensors, or .pt/.pth from torch.save(state_dict)")
    push.add_argument("--class", dest="class_name", help="class name (required on first push)")
    push.add_argument("--alias", help="point this alias at the new version")
    push.add_argument("--tag", action="append", metavar="KEY=VALUE")
    push.add_argument("--description", default="")
    push.add_argument("--parent", type=int, help="version this one was derived from")
    listing = _command(commands, "list", cmd_list, "list models, or one model's versions")
    listing.add_argument("model", nargs="?")
    _command(commands, "show", cmd_show, "show a version").add_argument(
        "ref", metavar="MODEL[:VERSION|:ALIAS]"
    )
    tag = _command(commands, "tag", cmd_tag, "set or remove tags on a version")
    tag.add_argument("ref", metavar="MODEL[:VERSION|:ALIAS]")
    tag.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY")
    delete = _command(commands, "delete", cmd_delete, "delete a version")
    delete.add_argument("ref", metavar="MODEL:VERSION")
    delete.add_argument("--force", action="store_true", help="also remove aliases pointing at it")
    export = _command(commands, "export", cmd_export, "write a version to .pth or .safetensors")
    export.add_argument("ref", metavar="MODEL[:VERSION|:ALIAS]")
    export.add_argument("file")


def _add_alias_commands(commands: Any) -> None:
    alias = commands.add_parser("alias", help="move, remove and audit aliases").add_subparsers(
        required=True, metavar="COMMAND"
    )
    set_ = _command(alias, "set", cmd_alias_set, "point an alias at a version")
    set_.add_argument("model")
    set_.add_argument("alias")
    set_.add_argument("version")
    unset = _command(alias, "unset", cmd_alias_unset, "remove an alias")
    unset.add_argument("model")
    unset.add_argument("alias")
    for sub in (set_, unset):
        sub.add_argument(
            "--expect",
            metavar="VERSION|none",
            help="only if the alias still points at VERSION (none: unset)",
        )
    history = _command(alias, "history", cmd_alias_history, "show alias moves")
    history.add_argument("model")
    history.add_argument("alias", nargs="?")


def _add_maintenance_commands(commands: Any) -> None:
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


def _add_dataset_commands(commands: Any) -> None:
    datasets = commands.add_parser("datasets", help="fine-tuning datasets").add_subparsers(
        required=True, metavar="COMMAND"
    )
    push = _command(datasets, "push", cmd_datasets_push, "push named tensors as a dataset")
    push.add_argument("name")
    push.add_argument("file", help=".safetensors, .pt or .npz with tensors such as inputs, targets")
    push.add_argument("--description", default="")
    _command(datasets, "list", cmd_datasets_list, "list datasets")
    _command(datasets, "show", cmd_datasets_show, "show a dataset").add_argument("name")
