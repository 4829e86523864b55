"""`moduleserve-worker` as real processes: SIGKILL mid-job and resume; several on PostgreSQL;
an idle worker that has not imported torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.demo.seed import seed_demo
from moduleserve.registry.entities import Job
from moduleserve.registry.jobspec import JobSpec
from tests.helpers import REPO, postgres_schema, postgres_url, registry_settings, subprocess_env


def learnable(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n, 784)).astype(np.float32)
    targets = inputs[:, :10].argmax(axis=1).astype(np.int64)
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


Popen = subprocess.Popen[bytes]


class Workers:
    """Worker processes on one registry, killed at the end of the test."""

    def __init__(self, registry: Registry) -> None:
        self.env = subprocess_env(registry.settings.database_url(), registry.settings.store)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, lease_s: float = 1.5, stderr: int = subprocess.DEVNULL) -> Popen:
        args = [sys.executable, "-m", "moduleserve.server.jobs.worker", "--worker-id", name]
        args += ["--lease-s", str(lease_s), "--poll-s", "0.1", "--nice", "0"]
        proc = subprocess.Popen(args, env=self.env, cwd=REPO, stderr=stderr)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def sqlite_demo(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(registry_settings(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"))
    reg.init()
    seed_demo(reg)
    yield reg
    reg.close()


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> Iterator[Callable[[Registry], Workers]]:
    made: list[Workers] = []

    def make(registry: Registry) -> Workers:
        made.append(Workers(registry))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


def queue(registry: Registry, spec: JobSpec, dataset: str = "digits") -> str:
    base = registry.checkpoints.resolve("mlp", "production")
    digest = registry.datasets.get(dataset).digest
    return registry.jobs.create(
        base, dataset, digest, spec.to_dict(), alias=None, created_by="t"
    ).id


def wait(registry: Registry, job_id: str, done: Callable[[Job], bool], timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = registry.jobs.get(job_id)
        if done(job):
            return job
        time.sleep(0.02)
    raise AssertionError(
        f"job {job_id} did not get there in {timeout}s: {registry.jobs.get(job_id)}"
    )


@pytest.mark.parametrize("kill_after_epochs", [0, 1], ids=["before-any-epoch", "after-an-epoch"])
def test_a_killed_workers_job_is_resumed_by_another_with_the_same_result(
    sqlite_demo: Registry, workers: Callable[[Registry], Workers], kill_after_epochs: int
) -> None:
    registry = sqlite_demo
    registry.push_dataset("digits", learnable(4096))
    spec = JobSpec(epochs=5, batch_size=16, val_split=0.1, seed=3, learning_rate=1e-3)
    group = workers(registry)
    doomed = group.start("doomed")
    job_id = queue(registry, spec)
    wait(
        registry, job_id, lambda j: j.state == "running" and len(j.epochs) >= kill_after_epochs, 60
    )

    doomed.send_signal(signal.SIGKILL)
    doomed.wait()

    killed = registry.jobs.get(job_id)
    assert killed.state == "running" and killed.worker == "doomed"
    assert (len(killed.epochs) > 0) == (kill_after_epochs > 0)  # resume, or start over
    assert len(killed.epochs) < spec.epochs
    group.start("rescuer")
    done = wait(registry, job_id, lambda j: j.finished, 90)
    assert (done.state, done.attempts, done.worker) == ("succeeded", 2, "rescuer")
    messages = [e.data.get("message", "") for e in registry.jobs.events(job_id)]
    resumed = [m for m in messages if m.startswith("resuming after epoch")]
    assert bool(resumed) == bool(killed.epochs)
    versions = [v for v in registry.checkpoints.list_versions("mlp") if v.source == f"job {job_id}"]
    assert len(versions) == 1 and versions[0].parent_version == 1

    # The same job run without interruption gives bitwise the same weights: the optimizer,
    # schedule and random number generators were restored, not restarted.
    reference = wait(registry, queue(registry, spec), lambda j: j.finished, 90)
    assert reference.state == "succeeded"
    reference_version = registry.checkpoints.resolve("mlp", str(reference.result_version))
    assert reference_version.digest == versions[0].digest


def test_three_workers_run_ten_jobs_each_exactly_once_on_postgresql(
    tmp_path: Path, workers: Callable[[Registry], Workers]
) -> None:
    base_url = postgres_url()
    if base_url is None:
        pytest.skip("no PostgreSQL configured (set MODULESERVE_TEST_POSTGRES_URL)")
    with postgres_schema(base_url) as url:
        registry = Registry(registry_settings(url, tmp_path / "store"))
        registry.init()
        seed_demo(registry)
        registry.push_dataset("digits", learnable(64))
        ids = [queue(registry, JobSpec(seed=i)) for i in range(10)]
        group = workers(registry)
        for index in range(3):
            group.start(f"w{index}", lease_s=30)

        jobs = [wait(registry, job_id, lambda j: j.finished, 120) for job_id in ids]
        group.stop_all()

        assert [(j.state, j.attempts) for j in jobs] == [("succeeded", 1)] * 10
        for job in jobs:
            started = [e for e in registry.jobs.events(job.id) if e.data.get("state") == "running"]
            assert len(started) == 1
        sources = [v.source for v in registry.checkpoints.list_versions("mlp")]
        assert sorted(sources[1:]) == sorted(f"job {job_id}" for job_id in ids)
        registry.close()


def mapped_packages(pid: int, names: tuple[str, ...]) -> set[str]:
    """The installed packages among `names` with a file (a compiled extension, libtorch)
    mapped into process `pid`: what importing them leaves, seen from outside the process."""
    from importlib.util import find_spec

    maps = (Path(m.path) for m in psutil.Process(pid).memory_maps(grouped=True) if m.path)
    paths = {p.resolve() for p in maps if p.is_absolute()}
    found = set()
    for name in names:
        spec = find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        folder = Path(next(iter(spec.submodule_search_locations))).resolve()
        if any(folder in p.parents for p in paths):
            found.add(name)
    return found


def wait_ready(proc: Popen) -> None:
    """Read the worker's log until it says it is ready (it has its registry, no job yet)."""
    assert proc.stderr is not None
    lines = []
    for raw in proc.stderr:
        lines.append(raw.decode(errors="replace"))
        if " ready: " in lines[-1]:
            return
    raise AssertionError("the worker exited before it was ready:\n" + "".join(lines))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_an_idle_worker_has_not_imported_torch_until_it_claims_a_job(
    sqlite_demo: Registry, workers: Callable[[Registry], Workers]
) -> None:
    heavy = ("torch", "safetensors", "numpy")
    # The check sees torch where it was imported: in this test's own process.
    assert "torch" in mapped_packages(os.getpid(), heavy)
    registry = sqlite_demo
    proc = workers(registry).start("idle", stderr=subprocess.PIPE)
    wait_ready(proc)
    # Several empty polls (--poll-s 0.1) later, the idle loop has loaded nothing heavy.
    time.sleep(1.0)
    assert proc.poll() is None
    assert mapped_packages(proc.pid, heavy) == set()

    registry.push_dataset("digits", learnable(64))
    job = wait(registry, queue(registry, JobSpec(seed=1)), lambda j: j.finished, 90)

    assert job.state == "succeeded"
    assert "torch" in mapped_packages(proc.pid, heavy)
