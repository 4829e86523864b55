"""One job run in-process by the worker's runner (no subprocess): what it registers."""

from __future__ import annotations

import threading

import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.jobspec import JobSpec
from moduleserve.server.jobs.runner import run_job


def test_early_stopping_registers_the_best_epoch_not_the_last(demo_registry: Registry) -> None:
    # Random labels: the training loss falls while the validation loss soon rises.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 784, generator=generator)
    targets = torch.randint(0, 10, (256,), generator=generator)
    demo_registry.push_dataset("noise", {"inputs": inputs, "targets": targets})
    spec = JobSpec(epochs=30, learning_rate=0.01, val_split=0.25, early_stopping_patience=1, seed=0)
    base = demo_registry.checkpoints.resolve("mlp", "production")
    digest = demo_registry.datasets.get("noise").digest
    demo_registry.jobs.create(base, "noise", digest, spec.to_dict(), alias=None, created_by="t")
    job = demo_registry.jobs.claim("w1", lease_s=30, max_attempts=3)
    assert job is not None

    outcome = run_job(demo_registry, job, "w1", torch.device("cpu"), 30, threading.Event())

    assert outcome.state == "succeeded", outcome.detail
    done = demo_registry.jobs.get(job.id)
    assert done.metrics["stopped_early"] is True
    assert done.best_epoch < len(done.epochs) < spec.epochs
    registered = demo_registry.checkpoints.resolve("mlp", str(done.result_version))
    assert registered.digest == done.epochs[done.best_epoch - 1].digest
    assert registered.digest != done.epochs[-1].digest
