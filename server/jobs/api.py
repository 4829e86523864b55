"""Fine-tuning handlers the front ends call: plain functions over the registry, no gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

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


@dataclass
class _Feed:
    """One job's poller and the queues of the watchers it fans out to."""

    seq: int
    """Events up to here have been handed to the watchers."""
    queues: set[asyncio.Queue[JobEvent | BaseException | None]] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class JobFeeds:
    """Follows jobs for WatchJob streams: every watcher of one job shares one poller, which
    reads the job's new events once per `poll_s` and hands them to each watcher. The first
    watcher starts it; the last one to leave stops it.

    Lives on the event loop of the servicer that owns it (not thread-safe)."""

    def __init__(self, registry: Registry, poll_s: float = WATCH_POLL_S) -> None:
        self._registry = registry
        self._poll_s = poll_s
        self._feeds: dict[str, _Feed] = {}

    async def follow(
        self, job_id: str, after_seq: int = 0, stop: asyncio.Event | None = None
    ) -> AsyncIterator[JobEvent]:
        """The job's stored events after `after_seq`, then new ones as they are stored,
        until the job has ended and its last event was given, or `stop` is set (the server
        stops: the watcher reconnects elsewhere with the last seq it saw)."""
        stop = stop or asyncio.Event()
        feed = self._feeds.get(job_id)
        if feed is None:
            # The poller starts where this watcher is: its first read is this one's replay.
            feed = self._feeds[job_id] = _Feed(seq=after_seq)
            feed.task = asyncio.create_task(self._poll(job_id, feed), name=f"watch-{job_id}")
        queue: asyncio.Queue[JobEvent | BaseException | None] = asyncio.Queue()
        feed.queues.add(queue)
        # Registered before `upto` is read, with no await between: events after `upto`
        # reach the queue, those up to it come from the replay; none twice, none missed.
        upto, seq = feed.seq, after_seq
        try:
            if after_seq < upto:
                for event in await asyncio.to_thread(self._registry.jobs.events, job_id, seq):
                    if event.seq > upto:
                        break
                    seq = event.seq
                    yield event
            while True:
                item = await _next(queue, stop)
                if item is None:
                    return  # the job ended (or the server stops)
                if isinstance(item, BaseException):
                    raise item
                if item.seq > seq:
                    seq = item.seq
                    yield item
        finally:
            feed.queues.discard(queue)
            if not feed.queues and feed.task is not None and not feed.task.done():
                feed.task.cancel()  # the last watcher left
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]

    @property
    def followed(self) -> set[str]:
        """Ids of the jobs being polled now (one poller each)."""
        return set(self._feeds)

    def wake(self, job_id: str) -> None:
        """Poll a followed job now (this server just changed it, e.g. asked it to cancel)."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.wake.set()

    async def _poll(self, job_id: str, feed: _Feed) -> None:
        finished = False
        try:
            while not finished:
                events, finished = await asyncio.to_thread(
                    self._registry.jobs.poll, job_id, feed.seq
                )
                for event in events:
                    feed.seq = event.seq
                    for queue in feed.queues:
                        queue.put_nowait(event)
                if not finished:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(feed.wake.wait(), self._poll_s)
                    feed.wake.clear()
            ending: BaseException | None = None
        except Exception as exc:  # the database went away, the job was deleted: tell all
            ending = exc
        if self._feeds.get(job_id) is feed:
            del self._feeds[job_id]  # a later watcher starts a new poller
        for queue in feed.queues:
            queue.put_nowait(ending)  # None: the job ended; an error: each watcher raises it


async def _next(
    queue: asyncio.Queue[JobEvent | BaseException | None], stop: asyncio.Event
) -> JobEvent | BaseException | None:
    """The queue's next item, or None once `stop` is set."""
    if not queue.empty():
        return queue.get_nowait()
    if stop.is_set():
        return None
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None
