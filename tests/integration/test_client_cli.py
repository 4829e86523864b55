"""The `moduleserve` CLI against a real server, called in-process through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moduleserve.client.cli import main
from tests.helpers import ServerThread


def run(
    served: ServerThread, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = main(["--target", served.target, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_load_infer_unload(
    served: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(served, capsys, "models")
    assert code == 0 and "mynet" in out and "UNAVAILABLE" in out
    assert run(served, capsys, "load", "doubler")[0] == 0
    np.save(tmp_path / "x.npy", np.array([[4.0], [5.0]], np.float32))
    code, out, _ = run(
        served,
        capsys,
        "--json",
        "infer",
        "doubler",
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.npz"),
    )
    assert code == 0 and json.loads(out) == {"output0": [[9.0], [11.0]]}
    assert np.load(tmp_path / "y.npz")["output0"].tolist() == [[9.0], [11.0]]
    code, out, _ = run(served, capsys, "infer", "mynet:production", "--random", "--batch", "2")
    assert code == 0 and "output0 float32[2, 10]" in out
    assert out.startswith("answered by mynet:1\n")  # the version the alias pointed at
    assert run(served, capsys, "--json", "models", "--ready")[1].count('"READY"') == 2
    assert run(served, capsys, "unload", "doubler")[0] == 0
    code, out, _ = run(served, capsys, "metadata", "mlp")
    assert code == 0 and "x        FP32      [-1, 784]" in out


def test_health_exit_codes(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(served, capsys, "health") == (0, "SERVING\n", "")
    assert run(served, capsys, "health", "mlp")[:2] == (1, "SERVICE_UNKNOWN\n")
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "health"]) == 1


def test_errors_are_one_sentence(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(served, capsys, "infer", "ghost", "--random")
    assert (code, out, err) == (1, "", "error: model 'ghost' not found\n")
    code, _, err = run(served, capsys, "infer", "mynet")
    assert code == 1 and "--input FILE" in err
