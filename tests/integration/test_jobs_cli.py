"""`moduleserve finetune`, `jobs …` and `datasets …` against a real server and its worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moduleserve.client.cli import main
from moduleserve.registry.api import Registry
from tests.helpers import ServerThread


def _run(
    server: ServerThread, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    code = main(["--target", server.target, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _toy(path: Path, n: int = 128) -> Path:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((n, 784)).astype(np.float32)
    np.savez(path, inputs=inputs, targets=inputs[:, :10].argmax(axis=1))
    return path


def test_finetune_follows_the_job_to_its_new_version_and_jobs_commands_show_it(
    trainer: ServerThread,
    demo_registry: Registry,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    code, out, err = _run(
        trainer, capsys, "datasets", "upload", "toy", str(_toy(tmp_path / "toy.npz"))
    )
    assert code == 0, err
    assert "inputs float32[128, 784]" in out

    code, out, err = _run(
        trainer,
        capsys,
        "finetune",
        "mlp:production",
        "--dataset",
        "toy",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "16",
        "--freeze",
        "layers.0.*",
        "--val-split",
        "0.25",
        "--seed",
        "0",
        "--alias",
        "staging",
        "--log-every",
        "2",
    )

    assert code == 0, err
    lines = out.splitlines()
    job_id = lines[0].split()[1]
    assert lines[0] == f"job {job_id} queued (mlp:1 on dataset toy)"
    assert any("[epoch 1/2] step 2/" in line and "loss" in line for line in lines)
    assert lines[-1] == f"job {job_id} succeeded: registered mlp:2 and moved alias staging"
    assert demo_registry.checkpoints.resolve("mlp", "staging").source == f"job {job_id}"

    code, out, _ = _run(trainer, capsys, "jobs", "list")
    assert code == 0 and job_id in out and "succeeded" in out and "mlp:2" in out
    png = tmp_path / "curves.png"
    code, out, err = _run(trainer, capsys, "jobs", "show", job_id, "--plot", str(png))
    assert code == 0, err
    assert "train loss" in out and "val loss" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = _run(trainer, capsys, "jobs", "logs", job_id)
    assert code == 0 and "succeeded" in out.splitlines()[-1]
    code, out, _ = _run(trainer, capsys, "--json", "jobs", "show", job_id)
    assert json.loads(out)["job"]["result_version"] == 2
    code, out, err = _run(trainer, capsys, "jobs", "promote", job_id, "--epoch", "1")
    assert code == 0, err
    assert out.startswith(f"registered mlp:3 from job {job_id} epoch 1")


def test_cli_errors_are_one_sentence(
    trainer: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _run(trainer, capsys, "datasets", "upload", "toy", str(_toy(tmp_path / "toy.npz")))
    code, out, err = _run(trainer, capsys, "finetune", "mlp", "--dataset", "toy", "--lr", "-1")
    assert code == 1 and out == ""
    assert err == "error: learning_rate must be > 0, got -1.0\n"
    code, _, err = _run(trainer, capsys, "jobs", "cancel", "nosuchjob")
    assert code == 1 and err == "error: job 'nosuchjob' not found\n"
