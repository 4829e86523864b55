"""`moduleserve-registry`, called in-process through main(argv) as a user would type it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moduleserve.registry.cli import main
from moduleserve.registry.demo.models import MyNet
from tests.helpers import Cli


@pytest.fixture
def cli(db_url: str, store: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(db_url, store, capsys)
    assert runner("init")[0] == 0
    return runner


def test_a_full_admin_session(cli: Cli, tmp_path: Path) -> None:
    code, out, _ = cli(
        "classes",
        "register",
        "MyNet",
        "moduleserve.registry.demo.models:MyNet",
        "--input",
        "x:float32:-1,3,8,8",
    )
    assert (code, out.strip()) == (0, "registered class MyNet")
    assert cli.json("classes", "show", "MyNet")["outputs"] == [
        {"name": "output0", "dtype": "float32", "shape": [-1, 10]}
    ]

    first, second = MyNet(), MyNet()
    torch.save(first.state_dict(), tmp_path / "v1.pth")
    save_file(second.state_dict(), str(tmp_path / "v2.safetensors"))
    assert (
        cli("push", "mynet", str(tmp_path / "v1.pth"), "--class", "MyNet", "--alias", "production")[
            1
        ].strip()
        == "mynet:1"
    )
    pushed = cli.json(
        "push",
        "mynet",
        str(tmp_path / "v2.safetensors"),
        "--parent",
        "1",
        "--tag",
        "team=vision",
        "--description",
        "second",
    )
    assert (pushed["version"], pushed["parent_version"], pushed["tags"]) == (
        2,
        1,
        {"team": "vision"},
    )

    code, out, _ = cli("list")
    assert code == 0 and "mynet" in out and "production=1" in out
    assert [v["version"] for v in cli.json("list", "mynet")] == [1, 2]
    code, out, _ = cli("show", "mynet:production")
    assert code == 0 and "version:     1" in out and "source:      upload" in out

    assert cli("alias", "set", "mynet", "production", "2", "--expect", "2")[0] == 1
    code, out, _ = cli("alias", "set", "mynet", "production", "2", "--expect", "1")
    assert (code, out.strip()) == (0, "mynet:production -> 2 (was 1)")
    history = cli.json("alias", "history", "mynet")
    assert [(e["from_version"], e["to_version"]) for e in history] == [(None, 1), (1, 2)]
    assert history[0]["actor"].startswith("moduleserve-registry")

    assert cli.json("tag", "mynet:1", "stage=old")["tags"] == {"stage": "old"}
    code, _, err = cli("delete", "mynet:2")
    assert code == 1 and "still pointed at by alias(es) production" in err
    assert cli("delete", "mynet:2", "--force")[0] == 0

    assert cli("export", "mynet:1", str(tmp_path / "out.pth"))[0] == 0
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in first.state_dict().items())
    assert cli("export", "mynet:1", str(tmp_path / "out.safetensors"))[0] == 0

    assert cli.json("verify") == {"checked": 1, "problems": []}
    gc = cli.json("gc", "--dry-run", "--min-age", "0")
    assert gc["dry_run"] is True and len(gc["digests"]) == 1


def test_datasets_commands(cli: Cli, tmp_path: Path) -> None:
    np.savez(tmp_path / "toy.npz", inputs=np.ones((4, 2), np.float32), targets=np.arange(4))
    code, out, _ = cli("datasets", "push", "toy", str(tmp_path / "toy.npz"))
    assert code == 0 and "inputs float32[4, 2]" in out
    assert [d["name"] for d in cli.json("datasets", "list")] == ["toy"]
    code, out, _ = cli("datasets", "show", "toy")
    assert code == 0 and "targets" in out and "int64" in out


def test_errors_are_one_sentence_with_exit_codes(cli: Cli, tmp_path: Path) -> None:
    code, out, err = cli("show", "ghost")
    assert (code, out, err) == (1, "", "error: model 'ghost' not found\n")
    code, _, err = cli("push", "../x", str(tmp_path / "none.pth"), "--class", "MyNet")
    assert code == 1 and "invalid model name '../x'" in err
    code, _, err = cli("classes", "register", "evil", "os:system", "--input", "x:float32:-1,1")
    assert code == 1 and "not under an allowed prefix" in err and "Traceback" not in err
    code, _, err = cli(
        "classes",
        "register",
        "c",
        "moduleserve.registry.demo.models:MyNet",
        "--kwargs",
        "{nope",
        "--input",
        "x:float32:-1,3,8,8",
    )
    assert code == 1 and "--kwargs is not valid JSON" in err
    with pytest.raises(SystemExit) as usage:
        cli("alias")
    assert usage.value.code == 2


def test_verify_fails_on_a_corrupt_blob(cli: Cli, store: Path, tmp_path: Path) -> None:
    cli(
        "classes",
        "register",
        "MyNet",
        "moduleserve.registry.demo.models:MyNet",
        "--input",
        "x:float32:-1,3,8,8",
    )
    torch.save(MyNet().state_dict(), tmp_path / "v.pth")
    digest = cli.json("push", "mynet", str(tmp_path / "v.pth"), "--class", "MyNet")["digest"]
    blob = store / "blobs" / "sha256" / digest[:2] / digest[2:]
    blob.write_bytes(blob.read_bytes()[:-10])
    code, out, _ = cli("verify")
    assert code == 1 and "corrupt" in out and "mynet:1" in out


def test_commands_refuse_a_missing_registry_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "elsewhere" / "new.db"
    code = main(["--db", f"sqlite:///{missing}", "--store", str(tmp_path / "store"), "list"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        f"error: there is no registry at {missing}: `moduleserve-registry init` creates one "
        "there; to use another, pass --db (or set MODULESERVE_DB, or db in moduleserve.toml)\n"
    )
    assert list(tmp_path.iterdir()) == []  # no folder, no empty database left behind


def test_commands_refuse_an_uninitialised_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    sqlite3.connect(tmp_path / "new.db").close()  # an empty file: not migrated
    code = main(["--db", f"sqlite:///{tmp_path / 'new.db'}", "--store", str(tmp_path), "list"])
    assert code == 1 and "run `moduleserve-registry init`" in capsys.readouterr().err


def test_demo_seeds_three_models_once(cli: Cli) -> None:
    pushed = cli.json("demo")
    assert sorted(v["model"] for v in pushed) == ["mlp", "mynet", "nested"]
    assert cli.json("demo") == []
    again = {m["name"]: m["aliases"] for m in cli.json("list")}
    assert again == {
        "mlp": {"production": 1},
        "mynet": {"production": 1},
        "nested": {"production": 1},
    }


def test_export_into_a_missing_folder_is_one_sentence(cli: Cli, tmp_path: Path) -> None:
    assert cli("demo")[0] == 0
    target = tmp_path / "no" / "such" / "mynet.pth"
    code, _, err = cli("export", "mynet:1", str(target))
    assert code == 1
    assert err == f"error: cannot export to {target}: folder {target.parent} does not exist\n"
