"""Hyperparameters out of their bounds are refused naming the field, through the Python API
and the gRPC CreateJob; a batch larger than the training data is lowered, with a sentence.
Also: several WatchJob streams of one job over gRPC end together when it is cancelled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import InvalidArgumentError
from moduleserve.registry.api import Registry
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.jobspec import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_STEPS, JobSpec
from moduleserve.server.jobs.api import create_job
from tests.helpers import ServerThread, server_settings

# Each: the field, a value past its bound, and the sentence that refuses it.
ABSURD = [
    ("epochs", 10**9, f"epochs must be from 1 to {MAX_EPOCHS}, got 1000000000"),
    ("batch_size", 10**9, f"batch_size must be from 1 to {MAX_BATCH_SIZE}, got 1000000000"),
    ("max_steps", 2**62, f"max_steps must be from 0 to {MAX_STEPS} (0: every epoch), got {2**62}"),
    ("warmup_steps", 2**40, f"warmup_steps must be from 0 to {MAX_STEPS}, got {2**40}"),
    ("log_every_steps", 10**9, f"log_every_steps must be from 1 to {MAX_STEPS}"),
    ("early_stopping_patience", 10**6, "early_stopping_patience must be from 0 to"),
    ("epochs", 0, f"epochs must be from 1 to {MAX_EPOCHS}, got 0"),
    ("max_steps", -1, "max_steps must be from 0 to"),
]


def digits(n: int) -> dict[str, np.ndarray]:
    """n examples the demo MLP (784 inputs, 10 classes) trains on."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((n, 784)).astype(np.float32)
    return {"inputs": inputs, "targets": inputs[:, :10].argmax(axis=1).astype(np.int64)}


@pytest.fixture
def server(demo_registry: Registry) -> Iterator[ServerThread]:
    """A server that queues jobs (no worker: nothing here needs one to run)."""
    settings = server_settings(demo_registry.settings.database_url(), demo_registry.settings.store)
    thread = ServerThread(settings)
    yield thread
    thread.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[ModelClient]:
    with ModelClient(server.target, timeout=30) as c:
        yield c


def queue_with(registry: Registry, **hyperparameters: Any) -> Any:
    return create_job(registry, "mlp", "", "digits", JobSpec(**hyperparameters), None, "test")


@pytest.mark.parametrize(("field", "value", "sentence"), ABSURD)
def test_absurd_values_are_refused_by_the_python_api(
    demo_registry: Registry, field: str, value: int, sentence: str
) -> None:
    demo_registry.push_dataset("digits", {k: torch.from_numpy(v) for k, v in digits(32).items()})
    with pytest.raises(InvalidInputError) as refused:
        queue_with(demo_registry, **{field: value})
    assert sentence in str(refused.value)
    assert demo_registry.jobs.list() == []


@pytest.mark.parametrize(("field", "value", "sentence"), ABSURD)
def test_absurd_values_are_refused_by_create_job(
    client: ModelClient, field: str, value: int, sentence: str
) -> None:
    client.upload_dataset("digits", digits(32))
    with pytest.raises(InvalidArgumentError) as refused:
        client.jobs.create("mlp", dataset="digits", **{field: value})
    assert sentence in refused.value.details
    assert client.jobs.list() == []
    assert client.health() == "SERVING"


def test_a_batch_larger_than_the_training_data_is_lowered_with_a_sentence(
    client: ModelClient, demo_registry: Registry
) -> None:
    client.upload_dataset("digits", digits(40))  # val_split 0.25 holds 10 out: 30 train

    job = client.jobs.create("mlp", dataset="digits", batch_size=64, val_split=0.25)
    fits = queue_with(demo_registry, batch_size=30, val_split=0.25)

    assert job.spec["batch_size"] == 30
    note = client.jobs.events(job.id)[1]
    assert (note.kind, note.message) == (
        "log",
        "batch_size 64 is more than the 30 training examples of dataset digits: lowered to "
        "30, one batch of all of them per epoch",
    )
    assert fits.spec["batch_size"] == 30
    assert [e.kind for e in demo_registry.jobs.events(fits.id)] == ["state"]  # nothing lowered


def test_watchers_of_one_job_all_see_it_end(client: ModelClient) -> None:
    client.upload_dataset("digits", digits(32))
    job = client.jobs.create("mlp", dataset="digits")
    seen: list[list[str]] = [[] for _ in range(5)]
    first_events = threading.Barrier(len(seen) + 1)

    def watch(into: list[str]) -> None:
        for event in client.jobs.watch(job.id):
            into.append(event.state)
            if len(into) == 1:
                first_events.wait(30)

    threads = [threading.Thread(target=watch, args=(into,)) for into in seen]
    for thread in threads:
        thread.start()
    first_events.wait(30)  # every stream is open and has the queued event

    assert client.jobs.cancel(job.id).state == "cancelled"

    for thread in threads:
        thread.join(30)
    assert seen == [["queued", "cancelled"]] * 5
    assert client.health() == "SERVING"
