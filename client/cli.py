"""`moduleserve`: call a moduleserve server from the shell."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moduleserve.client.client import ModelClient, ModelInfo
from moduleserve.client.errors import ModuleServeError
from moduleserve.client.inspect_cli import add_inspect_command
from moduleserve.client.jobs_cli import add_jobs_commands
from moduleserve.client.refs import split_ref
from moduleserve.client.tables import format_table, report_error, run_main, to_json
from moduleserve.client.version import version_text

DEFAULT_TARGET = "127.0.0.1:8001"
MODEL_REF_HELP = "model name, then :VERSION or :ALIAS (default: the default alias, else the latest)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success, 1 on failure, 2 on usage errors, 141 when stdout closed."""
    return run_main(lambda: _run(argv))


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ModuleServeError, ValueError, OSError) as exc:
        return report_error(exc, args)


def connect(args: argparse.Namespace) -> ModelClient:
    """A client for the global --target/--token/--timeout options."""
    return ModelClient(args.target, token=args.token, timeout=args.timeout)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 only when the server (or the named model) is SERVING."""
    with connect(args) as client:
        status = client.health(args.service)
    print(to_json({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def cmd_models(args: argparse.Namespace) -> int:
    """Every registry model version and its state on the server."""
    with connect(args) as client:
        entries = client.models(ready_only=args.ready)
    rows = [(e.name, e.version, e.state, e.reason) for e in entries]
    print(
        to_json([vars(e) for e in entries])
        if args.json
        else format_table(("MODEL", "VERSION", "STATE", "REASON"), rows)
    )
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    """Inputs and outputs of a model."""
    model, version = split_ref(args.model)
    with connect(args) as client:
        info = client.metadata(model, version)
    if args.json:
        print(
            to_json(
                {
                    "name": info.name,
                    "versions": info.versions,
                    "platform": info.platform,
                    "inputs": [vars(t) for t in info.inputs],
                    "outputs": [vars(t) for t in info.outputs],
                }
            )
        )
        return 0
    rows = [("input", t.name, t.datatype, list(t.shape)) for t in info.inputs]
    rows += [("output", t.name, t.datatype, list(t.shape)) for t in info.outputs]
    print(f"{info.name} (versions {', '.join(info.versions)})")
    print(format_table(("KIND", "NAME", "DATATYPE", "SHAPE"), rows))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Load a model now."""
    model, version = split_ref(args.model)
    with connect(args) as client:
        client.load(model, version)
    data = {"model": model, "version": version, "loaded": True}
    print(to_json(data) if args.json else f"loaded {args.model}")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    """Unload every version of a model."""
    with connect(args) as client:
        client.unload(args.model)
    data = {"model": args.model, "unloaded": True}
    print(to_json(data) if args.json else f"unloaded {args.model}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Run a model on a .npy/.npz file or on random input of its declared shape."""
    model, version = split_ref(args.model)
    with connect(args) as client:
        info = client.metadata(model, version)
        inputs = _load_inputs(info, args)
        result, answered = client.infer(
            model, inputs, version=version, priority=args.priority, return_version=True
        )
    outputs = result if isinstance(result, dict) else {info.outputs[0].name: result}
    if args.output:
        np.savez(args.output, **outputs)
    if args.json:
        print(to_json({name: value.tolist() for name, value in outputs.items()}))
    else:
        print(f"answered by {model}:{answered}")
        with np.printoptions(precision=4, suppress=True, threshold=200):
            for name, value in outputs.items():
                print(f"{name} {value.dtype}{list(value.shape)}:\n{value}")
    return 0


def _load_inputs(info: ModelInfo, args: argparse.Namespace) -> dict[str, np.ndarray]:
    if args.random:
        rng = np.random.default_rng(args.seed)
        return {
            t.name: rng.standard_normal([args.batch if d == -1 else d for d in t.shape]).astype(
                np.float32 if t.datatype == "FP32" else np.float64
            )
            for t in info.inputs
        }
    if args.input is None:
        raise ValueError("give --input FILE (.npy or .npz) or --random")
    path = Path(args.input)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    array = np.load(path, allow_pickle=False)
    if len(info.inputs) != 1:
        raise ValueError(f"{info.name} takes several inputs: pass an .npz with one array each")
    return {info.inputs[0].name: array}


def build_parser() -> argparse.ArgumentParser:
    """Global connection options and one sub-command per operation."""
    parser = argparse.ArgumentParser(prog="moduleserve", description="Call a moduleserve server.")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"host:port ({DEFAULT_TARGET})")
    parser.add_argument(
        "--token", help="bearer token (load/unload; reads where read tokens are set)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument(
        "--json", action="store_true", help="print JSON for scripts (also after the command)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    add = _adder(commands)
    health = add("health", cmd_health, "exit 0 when the server (or a model) is SERVING")
    health.add_argument("service", nargs="?", default="", help="a model name (default: server)")
    add("models", cmd_models, "list models and their states").add_argument(
        "--ready", action="store_true", help="only loaded models"
    )
    add("metadata", cmd_metadata, "show a model's inputs and outputs").add_argument(
        "model", metavar="MODEL[:VERSION]", help=MODEL_REF_HELP
    )
    add("load", cmd_load, "load a model now").add_argument(
        "model", metavar="MODEL[:VERSION]", help=MODEL_REF_HELP
    )
    add("unload", cmd_unload, "unload a model").add_argument(
        "model", help="model name (every loaded version is unloaded)"
    )
    infer = add("infer", cmd_infer, "run a model")
    infer.add_argument("model", metavar="MODEL[:VERSION|:ALIAS]", help=MODEL_REF_HELP)
    infer.add_argument("--input", help=".npy (one input) or .npz (named inputs)")
    infer.add_argument("--random", action="store_true", help="random normal input")
    infer.add_argument("--batch", type=int, default=1, help="rows of --random input")
    infer.add_argument("--seed", type=int, default=0, help="seed of --random input")
    infer.add_argument("--priority", type=int, default=0, help="1 is highest; 0 default")
    infer.add_argument("--output", help="also save the outputs to this .npz")
    add_inspect_command(commands)
    add_jobs_commands(commands)
    return parser


def _adder(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]:
    def add(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        # SUPPRESS: absent here leaves the global --json as it was.
        sub.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
        )
        sub.set_defaults(func=func)
        return sub

    return add
