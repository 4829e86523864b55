"""The Jobs and Datasets servicers (moduleserve.v1): thin adapters over server.jobs.api.

Who may call which (admin to start, cancel, promote and upload, read for the rest) is
security.GRPC_ACCESS, applied around every handler where they are registered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from moduleserve.client.pb import moduleserve_v1_pb2 as pb
from moduleserve.client.pb import moduleserve_v1_pb2_grpc as pb_grpc
from moduleserve.registry.api import Registry
from moduleserve.registry.errors import InvalidInputError
from moduleserve.registry.uploads import DatasetUpload
from moduleserve.server.convert_jobs import (
    dataset_to_pb,
    declared_from_pb,
    event_to_pb,
    job_to_pb,
    spec_from_pb,
    states_from_pb,
)
from moduleserve.server.jobs.api import JobFeeds, create_job
from moduleserve.server.status import map_errors, map_stream_errors

Context = grpc.aio.ServicerContext

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


class JobsServicer(pb_grpc.JobsServicer):
    """Create, read, follow, cancel and promote fine-tuning jobs."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.closing = asyncio.Event()
        """Set when the server stops: open WatchJob streams end instead of holding it up."""
        self.feeds = JobFeeds(registry)
        """Watchers of one job share one poller of the database."""

    @map_errors
    async def CreateJob(
        self, request: pb.CreateJobRequest, context: Context
    ) -> pb.CreateJobResponse:
        spec = spec_from_pb(request.spec)
        job = await asyncio.to_thread(
            create_job,
            self.registry,
            _required(request.base.model, "base.model"),
            request.base.version,
            _required(request.dataset, "dataset"),
            spec,
            request.alias or None,
            _actor(context),
        )
        return pb.CreateJobResponse(job=job_to_pb(job))

    @map_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        job = await asyncio.to_thread(self.registry.jobs.get, request.job_id)
        return pb.GetJobResponse(job=job_to_pb(job))

    @map_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        if request.limit < 0 or request.limit > MAX_LIST_LIMIT:
            raise InvalidInputError(f"limit must be between 0 and {MAX_LIST_LIMIT}")
        jobs = await asyncio.to_thread(
            self.registry.jobs.list,
            request.model or None,
            states_from_pb(request.states),
            request.limit or DEFAULT_LIST_LIMIT,
        )
        return pb.ListJobsResponse(jobs=[job_to_pb(job) for job in jobs])

    @map_stream_errors
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.JobEvent]:
        await asyncio.to_thread(self.registry.jobs.get, request.job_id)  # NOT_FOUND up front
        events = self.feeds.follow(request.job_id, request.after_seq, self.closing)
        # Closed here, not by the garbage collector, when the watcher goes: the job's poller
        # stops as soon as its last watcher has left.
        async with contextlib.aclosing(events):
            async for event in events:
                yield event_to_pb(event)

    @map_errors
    async def ListJobEvents(
        self, request: pb.ListJobEventsRequest, context: Context
    ) -> pb.ListJobEventsResponse:
        events = await asyncio.to_thread(
            self.registry.jobs.events, request.job_id, request.after_seq, max(request.limit, 0)
        )
        return pb.ListJobEventsResponse(events=[event_to_pb(e) for e in events])

    @map_errors
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        job = await asyncio.to_thread(
            self.registry.jobs.request_cancel, request.job_id, _actor(context)
        )
        self.feeds.wake(job.id)  # its watchers here see the request now, not a poll later
        return pb.CancelJobResponse(job=job_to_pb(job))

    @map_errors
    async def PromoteJob(
        self, request: pb.PromoteJobRequest, context: Context
    ) -> pb.PromoteJobResponse:
        if request.epoch < 0:
            raise InvalidInputError(f"epoch must be >= 0 (0: the best), got {request.epoch}")
        version, epoch = await asyncio.to_thread(
            self.registry.promote_job,
            request.job_id,
            request.epoch,
            request.alias or None,
            _actor(context),
        )
        return pb.PromoteJobResponse(
            version=pb.ModelVersion(
                model=version.model, version=version.version, class_name=version.class_name
            ),
            epoch=epoch,
        )


class DatasetsServicer(pb_grpc.DatasetsServicer):
    """Upload (streamed in chunks) and list datasets."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @map_errors
    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: Context
    ) -> pb.UploadDatasetResponse:
        upload: DatasetUpload | None = None
        try:
            async for message in request_iterator:
                upload = await self._take(upload, message)
            if upload is None:
                raise InvalidInputError("the upload sent no header")
            dataset = await asyncio.to_thread(upload.finish)
        except BaseException:
            if upload is not None:
                await asyncio.to_thread(upload.abort)
            raise
        return pb.UploadDatasetResponse(dataset=dataset_to_pb(dataset))

    async def _take(
        self, upload: DatasetUpload | None, message: pb.UploadDatasetRequest
    ) -> DatasetUpload:
        part = message.WhichOneof("part")
        if part == "header":
            if upload is not None:
                raise InvalidInputError("the upload sent a second header")
            header = message.header
            return await asyncio.to_thread(
                self.registry.start_dataset_upload,
                header.name,
                declared_from_pb(header),
                header.description,
            )
        if upload is None:
            raise InvalidInputError("the upload's first message must be its header")
        if part == "chunk":
            await asyncio.to_thread(upload.write, message.chunk)
        return upload

    @map_errors
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        datasets = await asyncio.to_thread(self.registry.datasets.list)
        return pb.ListDatasetsResponse(datasets=[dataset_to_pb(d) for d in datasets])


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidInputError(f"the request gives no {field}")
    return value


def _actor(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-moduleserve-user" and isinstance(value, str) and value:
            return value[:64]
    return f"rpc from {context.peer()}"[:128]
