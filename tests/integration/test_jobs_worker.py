"""`moduleserve-worker` as real processes: SIGKILL mid-job and resume; several on PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
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


class Workers:
    """Worker processes on one registry, killed at the end of the test."""

    def __init__(self, registry: Registry) -> None:
        self.env = subprocess_env(registry.settings.database_url(), registry.settings.store)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, lease_s: float = 1.5) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "moduleserve.server.jobs.worker", "--worker-id", name]
        args += ["--lease-s", str(lease_s), "--poll-s", "0.1", "--nice", "0"]
        proc = subprocess.Popen(args, env=self.env, cwd=REPO, stderr=subprocess.DEVNULL)
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
