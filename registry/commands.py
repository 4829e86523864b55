"""The admin CLI's command handlers: each turns parsed arguments into one registry call."""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moduleserve.client.tables import format_table, human_bytes, to_json
from moduleserve.registry.api import Registry
from moduleserve.registry.checkpoints import UNSET, _Unset
from moduleserve.registry.classes import parse_input_spec, parse_tensor_spec
from moduleserve.registry.entities import ModuleClass
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.names import parse_model_ref, parse_version


def actor() -> str:
    try:
        return f"moduleserve-registry ({getpass.getuser()})"
    except (KeyError, OSError):
        return "moduleserve-registry"


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(to_json(data) if args.json else text)


# -- commands ------------------------------------------------------------------------------


def cmd_init(registry: Registry, args: argparse.Namespace) -> int:
    """Create or migrate the schema."""
    before, after = registry.init()
    state = "already at" if before == after else f"migrated from {before or 'empty'} to"
    emit(args, {"before": before, "after": after}, f"registry schema {state} {after}")
    return 0


def cmd_demo(registry: Registry, args: argparse.Namespace) -> int:
    """Seed the demo models (idempotent)."""
    from moduleserve.registry.demo.seed import (
        seed_demo,  # imports torch: only this command needs it
    )

    pushed = seed_demo(registry)
    text = "\n".join(f"pushed {v.model}:{v.version} ({v.class_name})" for v in pushed)
    emit(args, [v.to_dict() for v in pushed], text or "demo models already present")
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
    outputs = [parse_tensor_spec(text, "output") for text in args.output or ()]
    module_class = registry.classes.register(
        args.name, args.import_path, kwargs, specs, args.description, outputs
    )
    emit(args, _class_dict(module_class), f"registered class {module_class.name}")
    return 0


def cmd_classes_update(registry: Registry, args: argparse.Namespace) -> int:
    """Change a class's specs or description (checked against every stored version)."""
    if not args.input and not args.output and args.description is None:
        raise InvalidInputError("nothing to update: give --input, --output or --description")
    module_class = registry.update_class(
        args.name,
        inputs=[parse_input_spec(text) for text in args.input or ()],
        outputs=[parse_tensor_spec(text, "output") for text in args.output or ()],
        description=args.description,
    )
    checked = sum(len(users) for users in registry.classes.versions_of(args.name).values())
    emit(
        args,
        _class_dict(module_class),
        f"updated class {module_class.name}: inputs {_specs(module_class.inputs)}; "
        f"outputs {_specs(module_class.outputs)} ({checked} version(s) checked)",
    )
    return 0


def cmd_classes_delete(registry: Registry, args: argparse.Namespace) -> int:
    """Remove a class no stored version uses."""
    module_class = registry.classes.delete(args.name)
    emit(args, _class_dict(module_class), f"deleted class {module_class.name}")
    return 0


def cmd_classes_list(registry: Registry, args: argparse.Namespace) -> int:
    """List registered classes."""
    classes = registry.classes.list()
    rows = [(c.name, c.import_path, json.dumps(c.kwargs), _specs(c.inputs)) for c in classes]
    emit(
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
    emit(args, _class_dict(c), text)
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
        key=args.key,
        actor=actor(),
    )
    emit(args, version.to_dict(), f"{version.model}:{version.version}")
    return 0


def cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    """List models, or one model's versions."""
    if args.model:
        versions = registry.checkpoints.list_versions(args.model)
        rows: list[tuple[object, ...]] = [
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
        emit(args, [v.to_dict() for v in versions], format_table(headers, rows))
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
    emit(args, data, format_table(("MODEL", "CLASS", "VERSIONS", "LATEST", "ALIASES"), rows))
    return 0


def cmd_show(registry: Registry, args: argparse.Namespace) -> int:
    """Show one version."""
    model, ref = parse_model_ref(args.ref)
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
    emit(args, v.to_dict(), text)
    return 0


def cmd_alias_set(registry: Registry, args: argparse.Namespace) -> int:
    """Point an alias at a version (compare-and-set with --expect)."""
    event = registry.checkpoints.set_alias(
        args.model,
        args.alias,
        parse_version(args.version),
        expect=_expect(args.expect),
        actor=actor(),
    )
    emit(
        args,
        vars(event),
        f"{args.model}:{args.alias} -> {event.to_version} (was {event.from_version or '-'})",
    )
    return 0


def cmd_alias_unset(registry: Registry, args: argparse.Namespace) -> int:
    """Remove an alias."""
    event = registry.checkpoints.unset_alias(
        args.model, args.alias, expect=_expect(args.expect), actor=actor()
    )
    emit(args, vars(event), f"{args.model}:{args.alias} removed (was {event.from_version})")
    return 0


def cmd_alias_history(registry: Registry, args: argparse.Namespace) -> int:
    """Show alias moves."""
    events = registry.checkpoints.alias_history(args.model, args.alias)
    rows = [
        (f"{e.at:%Y-%m-%d %H:%M:%S}", e.alias, e.from_version or "-", e.to_version or "-", e.actor)
        for e in events
    ]
    emit(
        args,
        [vars(e) for e in events],
        format_table(("WHEN (UTC)", "ALIAS", "FROM", "TO", "BY"), rows),
    )
    return 0


def cmd_tag(registry: Registry, args: argparse.Namespace) -> int:
    """Set or remove tags on a version."""
    model, ref = parse_model_ref(args.ref)
    version = registry.checkpoints.tag(model, ref, _pairs(args.pairs), args.remove)
    emit(args, version.to_dict(), f"{model}:{version.version} tags {json.dumps(version.tags)}")
    return 0


def cmd_delete(registry: Registry, args: argparse.Namespace) -> int:
    """Delete a version."""
    model, ref = parse_model_ref(args.ref)
    if not ref.isdigit():
        raise InvalidInputError("delete needs an explicit version number: MODEL:VERSION")
    version = registry.checkpoints.delete(model, int(ref), force=args.force, actor=actor())
    emit(
        args,
        version.to_dict(),
        f"deleted {model}:{version.version} "
        "(run `moduleserve-registry gc` to free its blob once nothing uses it)",
    )
    return 0


def cmd_export(registry: Registry, args: argparse.Namespace) -> int:
    """Export a version to .pth or .safetensors."""
    model, ref = parse_model_ref(args.ref)
    version = registry.export(model, ref, Path(args.file))
    emit(
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
    emit(args, {"checked": checked, "problems": [vars(p) for p in problems]}, text)
    return 1 if problems else 0


def cmd_gc(registry: Registry, args: argparse.Namespace) -> int:
    """Remove unreferenced blobs."""
    report = registry.gc(dry_run=args.dry_run, min_age_s=args.min_age)
    verb = "would remove" if report.dry_run else "removed"
    emit(
        args,
        vars(report),
        f"{verb} {len(report.digests)} blob(s), "
        f"{human_bytes(report.bytes_freed)}, and {len(report.temp_files)} temporary file(s)",
    )
    return 0


def cmd_datasets_push(registry: Registry, args: argparse.Namespace) -> int:
    """Push a dataset file."""
    dataset = registry.push_dataset_file(args.name, Path(args.file), args.description)
    emit(args, vars(dataset), f"dataset {dataset.name}: {_tensor_summary(dataset.tensors)}")
    return 0


def cmd_datasets_list(registry: Registry, args: argparse.Namespace) -> int:
    """List datasets."""
    datasets = registry.datasets.list()
    rows = [
        (d.name, _tensor_summary(d.tensors), human_bytes(d.size), d.digest[:12]) for d in datasets
    ]
    emit(
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
    emit(args, vars(d), text)
    return 0


# -- helpers -------------------------------------------------------------------------------


def _expect(text: str | None) -> int | _Unset | None:
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
