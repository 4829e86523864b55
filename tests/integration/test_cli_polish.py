"""What every CLI shares: --version, --json before or after the command (errors included),
a quiet end when stdout's reader leaves, an unreachable server named in one sentence,
help on every positional argument, and error tables that cover every status."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest

from moduleserve.client.cli import build_parser as client_parser
from moduleserve.client.cli import main as client_cli
from moduleserve.client.client import ModelClient
from moduleserve.client.errors import ERROR_FOR, ModuleServeError, UnavailableError
from moduleserve.client.tables import EXIT_BROKEN_PIPE, package_version
from moduleserve.registry import errors as registry_errors
from moduleserve.registry.api import Registry
from moduleserve.registry.cli import CODE_FOR, error_code
from moduleserve.registry.cli import build_parser as registry_parser
from moduleserve.server.cli import build_parser as server_parser
from moduleserve.server.jobs.worker import build_parser as worker_parser
from moduleserve.server.status import STATUS_FOR
from tests.helpers import REPO, Cli, ServerThread

UNREACHABLE = "127.0.0.1:1"  # a privileged port nothing listens on: connection refused
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "moduleserve": client_parser,
    "moduleserve-registry": registry_parser,
    "moduleserve-server": server_parser,
    "moduleserve-worker": worker_parser,
}


def run(
    served: ServerThread, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = client_cli(["--target", served.target, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(demo_registry: Registry, capsys: pytest.CaptureFixture[str]) -> Cli:
    settings = demo_registry.settings
    return Cli(settings.database_url(), settings.store, capsys)


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_cli_prints_its_version(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        PARSERS[prog]().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"{prog} {package_version()}\n"


def test_json_after_the_command(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(served, capsys, "models", "--json")
    assert code == 0 and ("doubler", "1") in [(m["name"], m["version"]) for m in json.loads(out)]
    code, out, _ = run(served, capsys, "load", "doubler", "--json")
    assert (code, json.loads(out)) == (0, {"model": "doubler", "version": "", "loaded": True})
    code, out, _ = run(served, capsys, "models", "--ready", "--json")
    assert [entry["name"] for entry in json.loads(out)] == ["doubler"]
    code, out, _ = run(served, capsys, "unload", "doubler", "--json")
    assert (code, json.loads(out)) == (0, {"model": "doubler", "unloaded": True})
    code, out, _ = run(served, capsys, "health", "--json")
    assert (code, json.loads(out)) == (0, {"status": "SERVING"})
    code, out, _ = run(served, capsys, "metadata", "mlp", "--json")
    assert code == 0 and json.loads(out)["inputs"][0]["shape"] == [-1, 784]
    # Given before the command it still works, and a command's own --json cannot unset it.
    code, out, _ = run(served, capsys, "--json", "health")
    assert json.loads(out) == {"status": "SERVING"}


def test_registry_json_after_the_command(cli: Cli) -> None:
    code, out, _ = cli("list", "--json")
    assert code == 0 and "mynet" in [m["name"] for m in json.loads(out)]
    code, out, _ = cli("show", "mynet:production", "--json")
    assert code == 0 and json.loads(out)["version"] == 1


def test_errors_are_json_objects_under_json(
    served: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(served, capsys, "infer", "ghost", "--random", "--json")
    assert (code, out) == (1, "")
    assert json.loads(err) == {"error": {"code": "NOT_FOUND", "message": "model 'ghost' not found"}}
    code, out, err = run(served, capsys, "--json", "load", "ghost")
    assert (code, out, json.loads(err)["error"]["code"]) == (1, "", "NOT_FOUND")
    code, _, err = run(served, capsys, "infer", "mynet", "--json")  # a local refusal
    assert code == 1 and json.loads(err)["error"]["code"] == "INVALID_ARGUMENT"
    code, _, err = run(served, capsys, "infer", "doubler", "--input", "/no/such.npy", "--json")
    assert code == 1 and json.loads(err)["error"]["code"] == "NOT_FOUND"
    code, _, err = run(served, capsys, "inspect", "ghost", "tree", "--json")
    assert code == 1 and json.loads(err)["error"]["code"] == "NOT_FOUND"
    code, _, err = run(served, capsys, "jobs", "show", "nope", "--json")
    assert code == 1 and set(json.loads(err)["error"]) == {"code", "message"}
    with ModelClient(served.target) as client:
        assert client.health() == "SERVING"


def test_registry_errors_are_json_objects_under_json(cli: Cli) -> None:
    code, out, err = cli("show", "ghost", "--json")
    assert (code, out) == (1, "")
    assert json.loads(err) == {"error": {"code": "NOT_FOUND", "message": "model 'ghost' not found"}}
    code, _, err = cli("alias", "set", "mynet", "production", "1", "--expect", "7", "--json")
    assert code == 1 and json.loads(err)["error"]["code"] == "ABORTED"
    code, _, err = cli("show", "ghost")
    assert err == "error: model 'ghost' not found\n"


def test_an_unreachable_server_is_one_sentence_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sentence = f"cannot reach a moduleserve server at {UNREACHABLE}: connection refused"
    for command in (["models"], ["jobs", "list"], ["inspect", "mynet", "tree"], ["health"]):
        code = client_cli(["--target", UNREACHABLE, "--timeout", "5", *command])
        assert (code, capsys.readouterr().err) == (1, f"error: {sentence}\n"), command
    with ModelClient(UNREACHABLE, timeout=5) as client, pytest.raises(UnavailableError) as caught:
        client.models()
    assert str(caught.value) == sentence
    assert "Connection refused" in caught.value.details  # gRPC's own text stays for --debug


def _closed_pipe_run(argv: Sequence[str]) -> tuple[int, str]:
    """Run a CLI whose stdout is a pipe nobody reads (the read end closed before it starts)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)
    return result.returncode, result.stderr


def test_a_closed_stdout_ends_quietly(served: ServerThread, demo_registry: Registry) -> None:
    settings = demo_registry.settings
    registry_args = ["--db", settings.database_url(), "--store", str(settings.store)]
    for argv in (
        ["-m", "moduleserve.client", "--target", served.target, "models"],
        ["-m", "moduleserve.registry", *registry_args, "list", "--json"],
    ):
        code, err = _closed_pipe_run(argv)
        assert (code, err) == (EXIT_BROKEN_PIPE, ""), argv
    assert (
        _closed_pipe_run(["-m", "moduleserve.client", "--version"])[1] == ""
    )  # argparse's own exit


def _positionals(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str | None]]:
    for action in parser._actions:  # argparse offers no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _positionals(sub, f"{path} {name}")
        elif not action.option_strings:
            yield f"{path} {action.dest}", action.help


def test_every_positional_argument_has_help() -> None:
    missing = [
        where
        for prog, parser in PARSERS.items()
        for where, text in _positionals(parser(), prog)
        if not text
    ]
    assert missing == []


def test_the_client_error_table_covers_every_status() -> None:
    assert set(ERROR_FOR) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    sent = {*STATUS_FOR.values(), grpc.StatusCode.INTERNAL}  # INTERNAL: unexpected errors
    for code in sent:
        error = ERROR_FOR[code](code, "details")
        assert type(error) is not ModuleServeError and error.code == code


def _server_code(cls: type[BaseException]) -> str | None:
    found = next((STATUS_FOR[c] for c in cls.__mro__ if c in STATUS_FOR), None)
    return found.name if found else None


def test_registry_cli_codes_agree_with_the_server() -> None:
    classes = [
        cls
        for cls in vars(registry_errors).values()
        if isinstance(cls, type) and issubclass(cls, registry_errors.RegistryError)
    ]
    for cls in classes:
        error = cls.__new__(cls)  # the codes depend on the class only
        assert error_code(error) == (_server_code(cls) or "UNKNOWN"), cls.__name__
    assert all(_server_code(cls) == code for cls, code in CODE_FOR)
