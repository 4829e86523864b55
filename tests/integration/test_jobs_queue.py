"""The job queue in the registry: states, events, leases, claims, results (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.entities import JobEpoch
from moduleserve.registry.errors import JobNotFoundError, JobStateError
from moduleserve.registry.jobs import JobResult
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.orm import utcnow

KWARGS = {"in_features": 4, "hidden": [8], "out_features": 3, "dropout": 0.0}


def _seed(registry: Registry) -> None:
    registry.classes.register(
        "MLP", "moduleserve.registry.demo.models:MLP", KWARGS, [parse_input_spec("x:float32:-1,4")]
    )
    module = registry.classes.build(registry.classes.get("MLP"))
    registry.push("mlp", module.state_dict(), class_name="MLP", alias="production")
    registry.push_dataset(
        "toy", {"inputs": torch.randn(16, 4), "targets": torch.randint(0, 3, (16,))}
    )


def _queue(registry: Registry, alias: str | None = None) -> str:
    base = registry.checkpoints.resolve("mlp", "production")
    dataset = registry.datasets.get("toy")
    job = registry.jobs.create(
        base, "toy", dataset.digest, JobSpec().to_dict(), alias=alias, created_by="test"
    )
    return job.id


def _result(registry: Registry, job_id: str) -> JobResult:
    weights = registry.state_dict(registry.checkpoints.resolve("mlp", "1"))
    from moduleserve.registry.formats import encode_tensors

    data = encode_tensors({k: v + 1 for k, v in weights.items()})
    return JobResult(registry.blobs.put(data), len(data), "MLP", {"train_loss": 0.5}, 0, "tuned")


@pytest.fixture
def seeded(registry: Registry) -> Registry:
    _seed(registry)
    return registry


def test_a_job_runs_queued_running_succeeded_with_ordered_events(seeded: Registry) -> None:
    job_id = _queue(seeded, alias="staging")
    assert seeded.jobs.get(job_id).state == "queued"
    claimed = seeded.jobs.claim("w1", lease_s=30, max_attempts=3)
    assert claimed is not None and claimed.id == job_id
    assert (claimed.state, claimed.worker, claimed.attempts) == ("running", "w1", 1)
    assert seeded.jobs.add_event(job_id, "w1", "progress", {"step": 10, "loss": 1.5})

    ended = seeded.jobs.succeed(job_id, "w1", _result(seeded, job_id))

    assert ended is not None and (ended.state, ended.result_version) == ("succeeded", 2)
    version = seeded.checkpoints.resolve("mlp", "2")
    assert (version.parent_version, version.source) == (1, f"job {job_id}")
    assert version.metrics["train_loss"] == 0.5
    assert version.metrics["hyperparameters"] == JobSpec().to_dict()
    job = seeded.jobs.get(job_id)
    assert (job.state, job.result_version, job.alias_moved) == ("succeeded", 2, True)
    assert job.started_at is not None and job.finished_at is not None
    assert job.finished_at >= job.started_at >= job.created_at
    assert seeded.checkpoints.resolve("mlp", "staging").version == 2
    history = seeded.checkpoints.alias_history("mlp", "staging")
    assert [(e.to_version, e.actor) for e in history] == [(2, f"job {job_id}")]
    events = seeded.jobs.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [(e.kind, e.data.get("state")) for e in events]
    assert kinds[:3] == [("state", "queued"), ("state", "running"), ("progress", None)]
    assert kinds[-1] == ("state", "succeeded")
    assert seeded.jobs.events(job_id, after_seq=len(events) - 1) == events[-1:]


def test_the_alias_moves_only_if_it_still_points_where_it_did(seeded: Registry) -> None:
    job_id = _queue(seeded, alias="production")
    seeded.push("mlp", seeded.state_dict(seeded.checkpoints.resolve("mlp", "1")))
    seeded.checkpoints.set_alias("mlp", "production", 2)  # someone moves it meanwhile
    seeded.jobs.claim("w1", lease_s=30, max_attempts=3)

    ended = seeded.jobs.succeed(job_id, "w1", _result(seeded, job_id))

    assert ended is not None and ended.result_version == 3
    assert seeded.checkpoints.resolve("mlp", "production").version == 2
    job = seeded.jobs.get(job_id)
    assert (job.state, job.alias_moved) == ("succeeded", False)
    assert "was not moved" in seeded.jobs.events(job_id)[-2].data["message"]


def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_lease(
    seeded: Registry,
) -> None:
    queued = _queue(seeded)
    assert seeded.jobs.request_cancel(queued, "alice").state == "cancelled"
    assert seeded.jobs.claim("w1", lease_s=30, max_attempts=3) is None

    running = _queue(seeded)
    seeded.jobs.claim("w1", lease_s=30, max_attempts=3)
    assert not seeded.jobs.renew(running, "w1", 30).cancel_requested
    assert seeded.jobs.request_cancel(running, "alice").state == "running"
    assert seeded.jobs.renew(running, "w1", 30).cancel_requested
    assert seeded.jobs.finish(running, "w1", "cancelled", "cancelled on request")
    with pytest.raises(JobStateError, match="already cancelled"):
        seeded.jobs.request_cancel(running, "alice")
    assert len(seeded.checkpoints.list_versions("mlp")) == 1


def test_an_expired_lease_hands_the_job_to_another_worker_and_fences_the_first(
    seeded: Registry,
) -> None:
    job_id = _queue(seeded)
    seeded.jobs.claim("w1", lease_s=0.05, max_attempts=3)
    assert seeded.jobs.claim("w2", lease_s=30, max_attempts=3) is None  # lease still valid
    time.sleep(0.1)

    taken = seeded.jobs.claim("w2", lease_s=30, max_attempts=3)

    assert taken is not None and (taken.worker, taken.attempts) == ("w2", 2)
    assert not seeded.jobs.renew(job_id, "w1", 30).held
    assert not seeded.jobs.add_event(job_id, "w1", "log", {"message": "late"})
    assert seeded.jobs.succeed(job_id, "w1", _result(seeded, job_id)) is None
    assert not seeded.jobs.finish(job_id, "w1", "failed", "late")
    assert seeded.jobs.get(job_id).state == "running"
    assert len(seeded.checkpoints.list_versions("mlp")) == 1


def test_a_job_whose_workers_keep_dying_is_failed_not_retried_forever(seeded: Registry) -> None:
    job_id = _queue(seeded)
    taken = seeded.jobs.claim("w0", lease_s=30, max_attempts=2)
    assert taken is not None and seeded.jobs.release(job_id, "w0", "w0 stopped")  # not a death
    for worker in ("w1", "w2"):
        assert seeded.jobs.claim(worker, lease_s=0.01, max_attempts=2) is not None
        time.sleep(0.05)

    assert seeded.jobs.claim("w3", lease_s=30, max_attempts=2) is None

    job = seeded.jobs.get(job_id)
    assert job.state == "failed" and "2 times" in job.reason and job.attempts == 3


def test_a_cancel_wins_over_a_result_that_arrives_after_it(seeded: Registry) -> None:
    job_id = _queue(seeded, alias="production")
    seeded.jobs.claim("w1", lease_s=30, max_attempts=3)
    seeded.jobs.request_cancel(job_id, "alice")  # during the last epoch's validation, say

    ended = seeded.jobs.succeed(job_id, "w1", _result(seeded, job_id))

    assert ended is not None and (ended.state, ended.result_version) == ("cancelled", None)
    assert len(seeded.checkpoints.list_versions("mlp")) == 1
    assert seeded.checkpoints.resolve("mlp", "production").version == 1


def test_a_job_without_a_live_worker_or_handed_back_is_cancelled_at_once(
    seeded: Registry,
) -> None:
    orphan = _queue(seeded)
    seeded.jobs.claim("w1", lease_s=0.01, max_attempts=3)
    time.sleep(0.05)  # its worker died
    assert seeded.jobs.request_cancel(orphan, "alice").state == "cancelled"

    handed_back = _queue(seeded)
    seeded.jobs.claim("w2", lease_s=30, max_attempts=3)
    seeded.jobs.request_cancel(handed_back, "alice")
    assert seeded.jobs.release(handed_back, "w2", "w2 stopped")
    assert seeded.jobs.get(handed_back).state == "cancelled"
    assert seeded.jobs.claim("w3", lease_s=30, max_attempts=3) is None


def test_released_jobs_return_to_the_queue(seeded: Registry) -> None:
    job_id = _queue(seeded)
    seeded.jobs.claim("w1", lease_s=30, max_attempts=3)
    assert seeded.jobs.release(job_id, "w1", "w1 stopped")
    again = seeded.jobs.claim("w2", lease_s=30, max_attempts=3)
    assert again is not None and (again.id, again.attempts) == (job_id, 2)


def test_concurrent_claimers_take_each_job_exactly_once(seeded: Registry) -> None:
    ids = {_queue(seeded) for _ in range(10)}
    taken: dict[str, list[str]] = {}
    lock = threading.Lock()

    def work(worker: str) -> None:
        while (job := seeded.jobs.claim(worker, lease_s=60, max_attempts=3)) is not None:
            with lock:
                taken.setdefault(job.id, []).append(worker)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert set(taken) == ids
    assert all(len(workers) == 1 for workers in taken.values())


def test_epochs_are_kept_their_blobs_survive_gc_and_promote_registers_one(
    seeded: Registry,
) -> None:
    job_id = _queue(seeded)
    seeded.jobs.claim("w1", lease_s=30, max_attempts=3)
    weights = seeded.checkpoints.resolve("mlp", "1")
    with pytest.raises(JobStateError, match="kept no epoch checkpoint yet"):
        seeded.promote_job(job_id)
    resume = [seeded.blobs.put(f"resume state {n}".encode()) for n in (1, 2, 3)]
    for epoch, val_loss in ((1, 0.9), (2, 0.7), (3, 0.8)):
        kept = JobEpoch(
            epoch, 1.0 / epoch, val_loss, weights.digest, weights.size, resume[epoch - 1], utcnow()
        )
        seeded.jobs.record_epoch(job_id, "w1", kept, is_best=val_loss < 0.8 or epoch == 1)

    job = seeded.jobs.get(job_id)
    assert [e.epoch for e in job.epochs] == [1, 2, 3] and job.best_epoch == 2
    # Only the newest epoch's resume state is kept (and gc leaves it alone).
    assert [e.resume_digest for e in job.epochs] == [None, None, resume[2]]
    report = seeded.gc(min_age_s=0)
    assert resume[2] not in report.digests and set(resume[:2]) <= set(report.digests)

    promoted, epoch = seeded.promote_job(job_id, alias="candidate")

    assert (promoted.version, promoted.parent_version, epoch) == (2, 1, 2)
    assert promoted.source == f"job {job_id} epoch 2"
    assert promoted.metrics["val_loss"] == 0.7
    assert seeded.checkpoints.resolve("mlp", "candidate").version == 2
    with pytest.raises(JobStateError, match="kept no checkpoint of epoch 7"):
        seeded.promote_job(job_id, epoch=7)


def test_unknown_jobs_and_states_are_named(seeded: Registry) -> None:
    with pytest.raises(JobNotFoundError, match="job 'nope' not found"):
        seeded.jobs.get("nope")
    with pytest.raises(Exception, match="unknown job state 'sleeping'"):
        seeded.jobs.list(states=["sleeping"])
