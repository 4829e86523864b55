"""Fine-tuning over gRPC: a real server, its real worker process, the Python client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ModuleServeError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from moduleserve.client.jobs import JobInfo
from moduleserve.registry.api import Registry
from tests.helpers import ServerThread, server_settings

FINISHED = {"succeeded", "failed", "cancelled"}


def learnable(n: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """784-feature inputs whose class is decided by the first ten features (learnable)."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n, 784)).astype(np.float32)
    return {"inputs": inputs, "targets": inputs[:, :10].argmax(axis=1).astype(np.int64)}


def wait_until_finished(client: ModelClient, job_id: str, timeout: float = 90) -> JobInfo:
    """Poll until the job ends (tests that follow events use watch instead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.jobs.get(job_id)
        if job.state in FINISHED:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {client.jobs.get(job_id)}")


def wait_for_state(client: ModelClient, job_id: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.jobs.get(job_id).state != state:
        assert time.monotonic() < deadline, f"job {job_id} never reached {state}"
        time.sleep(0.05)


@pytest.fixture
def client(trainer: ServerThread) -> Iterator[ModelClient]:
    with ModelClient(trainer.target, timeout=30) as c:
        yield c


def test_a_dataset_three_times_the_message_limit_uploads_in_chunks(
    client: ModelClient, demo_registry: Registry
) -> None:
    data = learnable(n=1200)  # 3.8 MB of inputs against a 1 MiB message limit
    assert data["inputs"].nbytes > 3 * 2**20

    info = client.upload_dataset("big", data, description="three messages' worth")

    assert info.tensors["inputs"] == {"dtype": "float32", "shape": [1200, 784]}
    stored = demo_registry.load_dataset("big")
    assert torch.equal(stored["inputs"], torch.from_numpy(data["inputs"]))
    assert torch.equal(stored["targets"], torch.from_numpy(data["targets"]))
    assert "big" in {d.name for d in client.jobs.datasets()}
    with pytest.raises(ModuleServeError) as exists:
        client.upload_dataset("big", data)
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert client.health() == "SERVING"


def test_a_job_trains_registers_a_child_version_moves_the_alias_and_is_served(
    client: ModelClient, demo_registry: Registry
) -> None:
    client.upload_dataset("digits", learnable())
    job = client.jobs.create(
        "mlp",
        "production",
        dataset="digits",
        epochs=3,
        learning_rate=1e-3,
        batch_size=32,
        optimizer="adamw",
        loss="cross_entropy",
        freeze=["layers.0.*"],
        val_split=0.1,
        seed=0,
        alias="staging",
    )
    assert job.state == "queued" and job.base_version == 1

    events = list(client.jobs.watch(job.id))

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    states = [e.state for e in events if e.kind == "state"]
    assert states == ["queued", "running", "succeeded"]
    epochs = [e for e in events if e.kind == "epoch"]
    assert [e.epoch for e in epochs] == [1, 2, 3]
    assert epochs[-1].loss is not None and epochs[-1].loss < epochs[0].loss
    assert any(e.kind == "progress" and e.examples_per_second > 0 for e in events)
    done = client.jobs.get(job.id)
    assert (done.state, done.result_version, done.alias_moved) == ("succeeded", 2, True)
    assert 1 <= done.best_epoch <= 3 and len(done.epochs) == 3
    version = demo_registry.checkpoints.resolve("mlp", "staging")
    assert (version.version, version.parent_version) == (2, 1)
    assert version.source == f"job {job.id}"
    assert version.metrics["hyperparameters"]["freeze"] == ["layers.0.*"]
    base = demo_registry.state_dict(demo_registry.checkpoints.resolve("mlp", "1"))
    tuned = demo_registry.state_dict(version)
    assert torch.equal(base["layers.0.weight"], tuned["layers.0.weight"])  # frozen
    assert not torch.equal(base["layers.4.weight"], tuned["layers.4.weight"])
    # The running server serves the new version through the alias, no restart.
    x = np.random.default_rng(1).standard_normal((2, 784)).astype(np.float32)
    expected = demo_registry.build_version(version)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(client.infer("mlp", x, version="staging"), expected, rtol=1e-5)
    # A watcher that comes back replays from where it left off.
    assert [e.seq for e in client.jobs.watch(job.id, after_seq=events[-2].seq)] == [events[-1].seq]
    assert client.jobs.promote(job.id, epoch=1) == ("mlp", 3, 1)
    assert demo_registry.checkpoints.resolve("mlp", "3").source == f"job {job.id} epoch 1"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"optimizer": "adagrad"}, "optimizer"),
        ({"loss": "hinge"}, "loss"),
        ({"schedule": "step"}, "schedule"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_split": 1.0}, "val_split"),
        ({"freeze": ["encoder.*"]}, "freeze pattern 'encoder.*'"),
        ({"freeze": ["*"]}, "freeze"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_field(
    client: ModelClient, options: dict[str, object], field: str
) -> None:
    client.upload_dataset("digits", learnable(n=32))
    with pytest.raises(InvalidArgumentError, match=field):
        client.jobs.create("mlp", dataset="digits", **options)  # type: ignore[arg-type]
    assert client.jobs.list() == []
    assert client.health() == "SERVING"


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        (
            {"inputs": np.zeros((8, 100), np.float32), "targets": np.zeros(8, np.int64)},
            "expected shape [-1, 784], got [8, 100]",
        ),
        (
            {"inputs": np.zeros((8, 784), np.float32), "targets": np.full(8, 12, np.int64)},
            "class index 12 is out of range for 10 outputs",
        ),
        (
            {"inputs": np.zeros((8, 784), np.float32), "targets": np.zeros(8, np.float32)},
            "targets",
        ),
        ({"inputs": np.zeros((8, 784), np.float32)}, "targets"),
    ],
)
def test_data_that_does_not_fit_the_class_is_refused_before_queueing(
    client: ModelClient, dataset: dict[str, np.ndarray], words: str
) -> None:
    client.upload_dataset("bad", dataset)
    with pytest.raises(InvalidArgumentError) as refused:
        client.jobs.create("mlp", dataset="bad")
    assert words in refused.value.details
    assert client.jobs.list() == []
    assert client.health() == "SERVING"


def test_unknown_model_dataset_and_job_are_not_found(client: ModelClient) -> None:
    client.upload_dataset("digits", learnable(n=32))
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        client.jobs.create("nope", dataset="digits")
    with pytest.raises(NotFoundError, match="dataset 'missing' not found"):
        client.jobs.create("mlp", dataset="missing")
    with pytest.raises(NotFoundError, match="job 'abc' not found"):
        client.jobs.get("abc")
    with pytest.raises(NotFoundError):
        list(client.jobs.watch("abc"))
    assert client.health() == "SERVING"


def test_cancel_stops_a_running_job_within_two_seconds_and_registers_nothing(
    client: ModelClient, demo_registry: Registry
) -> None:
    client.upload_dataset("digits", learnable(n=512))
    job = client.jobs.create("mlp", dataset="digits", epochs=500, batch_size=8)
    wait_for_state(client, job.id, "running")
    time.sleep(0.3)

    started = time.monotonic()
    assert client.jobs.cancel(job.id).cancel_requested
    done = wait_until_finished(client, job.id, timeout=10)

    assert done.state == "cancelled"
    assert time.monotonic() - started < 2.0
    assert [v.version for v in demo_registry.checkpoints.list_versions("mlp")] == [1]
    with pytest.raises(FailedPreconditionError, match="already cancelled"):
        client.jobs.cancel(job.id)
    assert client.health() == "SERVING"


def test_a_failing_job_ends_failed_with_its_reason_and_the_worker_goes_on(
    client: ModelClient,
) -> None:
    poisoned = learnable(n=64)
    poisoned["inputs"][5, 3] = np.nan
    client.upload_dataset("poisoned", poisoned)
    client.upload_dataset("digits", learnable(n=64))
    bad = client.jobs.create("mlp", dataset="poisoned", batch_size=64)
    good = client.jobs.create("mlp", dataset="digits")

    failed = wait_until_finished(client, bad.id)
    assert failed.state == "failed"
    assert "loss became NaN" in failed.reason
    assert wait_until_finished(client, good.id).state == "succeeded"


def test_a_queued_job_is_cancelled_at_once(client: ModelClient) -> None:
    client.upload_dataset("digits", learnable(n=512))
    blocker = client.jobs.create("mlp", dataset="digits", epochs=500, batch_size=8)
    queued = client.jobs.create("mlp", dataset="digits")
    wait_for_state(client, blocker.id, "running")

    assert client.jobs.cancel(queued.id).state == "cancelled"
    client.jobs.cancel(blocker.id)
    assert wait_until_finished(client, blocker.id).state == "cancelled"
    assert [j.state for j in client.jobs.list(states=["cancelled"])] == ["cancelled"] * 2


def test_job_calls_need_the_admin_token_and_reads_need_a_read_token_when_set(
    demo_registry: Registry,
) -> None:
    settings = server_settings(
        demo_registry.settings.database_url(),
        demo_registry.settings.store,
        tokens=["admin"],
        read_tokens=["reader"],
    )
    server = ServerThread(settings)
    try:
        data = learnable(n=16)
        with ModelClient(server.target, token="admin") as admin:
            admin.upload_dataset("digits", data)
            job = admin.jobs.create("mlp", dataset="digits")
            admin.jobs.cancel(job.id)
            writes = {
                "upload": lambda c: c.upload_dataset("more", data),
                "create": lambda c: c.jobs.create("mlp", dataset="digits"),
                "cancel": lambda c: c.jobs.cancel(job.id),
                "promote": lambda c: c.jobs.promote(job.id),
            }
            reads = {
                "get": lambda c: c.jobs.get(job.id),
                "list": lambda c: c.jobs.list(),
                "events": lambda c: c.jobs.events(job.id),
                "watch": lambda c: list(c.jobs.watch(job.id)),
                "datasets": lambda c: c.jobs.datasets(),
            }
            with ModelClient(server.target) as anonymous:
                for name, call in {**writes, **reads}.items():
                    with pytest.raises(UnauthenticatedError):
                        call(anonymous)
                        pytest.fail(f"{name} needs no token")
            with ModelClient(server.target, token="reader") as reader:
                for call in reads.values():
                    call(reader)
                for name, call in writes.items():
                    with pytest.raises(PermissionDeniedError):
                        call(reader)
                        pytest.fail(f"{name} accepts a read token")
            for call in reads.values():
                call(admin)  # the admin token reads too
            assert admin.jobs.get(job.id).state == "cancelled"
            assert admin.health() == "SERVING"
    finally:
        server.stop()
