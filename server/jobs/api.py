"""Fine-tuning handlers the front ends call: plain functions over the registry, no gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from moduleserve.registry.api import Registry
from moduleserve.registry.entities import Job, JobEvent
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.jobspec import JobSpec
from moduleserve.registry.names import check_alias
from moduleserve.server.jobs.data import train_data_from, validation_size

WATCH_POLL_S = 0.25


def create_job(
    registry: Registry,
    model: str,
    ref: str,
    dataset: str,
    spec: JobSpec,
    alias: str | None,
    actor: str,
) -> Job:
    """Validate the hyperparameters against the class and the data, then queue the job.

    Everything that can be known before training is checked here, so that a job with a
    typo fails in the caller's terminal, not minutes later in a worker. A batch_size larger
    than the training examples is lowered to their number (what one batch can hold), and
    a log event on the job says so.
    """
    spec.check()
    if alias:
        check_alias(alias)
    base = registry.checkpoints.resolve(model, ref)
    module_class = registry.module_class_of(base)
    skeleton = registry.classes.build(module_class, device="meta")
    names = [name for name, _ in skeleton.named_parameters()]
    frozen = set(spec.frozen_names(names))
    if not any(p.requires_grad and n not in frozen for n, p in skeleton.named_parameters()):
        raise InvalidInputError(
            f"freeze: every parameter of {module_class.name} would be frozen; nothing would train"
        )
    stored = registry.datasets.get(dataset)
    # Shapes and target ranges only: the worker verifies the blob's digest before training,
    # so the serving process does not hash a dataset of gigabytes here.
    data = train_data_from(registry.load_tensors(stored.digest, verify=False), module_class, spec)
    notes = []
    training = len(data) - validation_size(len(data), spec.val_split)
    if spec.batch_size > training:
        notes.append(
            f"batch_size {spec.batch_size} is more than the {training} training examples of "
            f"dataset {dataset}: lowered to {training}, one batch of all of them per epoch"
        )
        spec = dataclasses.replace(spec, batch_size=training)
    return registry.jobs.create(
        base,
        dataset,
        stored.digest,
        spec.to_dict(),
        alias=alias or None,
        created_by=actor,
        notes=notes,
    )


async def follow_events(
    registry: Registry,
    job_id: str,
    after_seq: int = 0,
    stop: asyncio.Event | None = None,
    poll_s: float = WATCH_POLL_S,
) -> AsyncIterator[JobEvent]:
    """The job's stored events after `after_seq`, then new ones as they are stored, until
    the job has ended and its last event was given, or `stop` is set (the server stops:
    the watcher reconnects elsewhere with the last seq it saw)."""
    stop = stop or asyncio.Event()
    seq = after_seq
    while not stop.is_set():
        events = await asyncio.to_thread(registry.jobs.events, job_id, seq)
        for event in events:
            seq = event.seq
            yield event
        if events:
            continue
        job = await asyncio.to_thread(registry.jobs.get, job_id)
        if job.finished:
            for event in await asyncio.to_thread(registry.jobs.events, job_id, seq):
                yield event
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
