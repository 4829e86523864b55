"""Registry entities and engine statistics → OIP metadata, config and statistics messages."""

from __future__ import annotations

from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.entities import Model, ModuleClass, TensorSpec, Version
from moduleserve.registry.formats import parse_dtype
from moduleserve.server.config import BatchingSettings
from moduleserve.server.convert import datatype_of
from moduleserve.server.engine.batcher import BatcherStats

PLATFORM = "pytorch"
BACKEND = "moduleserve"


def oip_datatype(spec: TensorSpec) -> str:
    """A registry dtype name ("float32") as an OIP datatype ("FP32")."""
    return datatype_of(parse_dtype(spec.dtype))


def model_metadata_to_pb(model: Model, module_class: ModuleClass) -> pb.ModelMetadataResponse:
    """ModelMetadata: versions, inputs and outputs with -1 for the batch dimension."""

    def tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=oip_datatype(spec), shape=list(spec.shape)
        )

    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in model.versions],
        platform=PLATFORM,
        inputs=[tensor(s) for s in module_class.inputs],
        outputs=[tensor(s) for s in module_class.outputs],
    )


def model_config_to_pb(
    version: Version,
    module_class: ModuleClass,
    batching: BatchingSettings,
    compute: str = "",
    forward_ms: float | None = None,
) -> pb.ModelConfigResponse:
    """ModelConfig in Triton's shape: dims exclude the batch dimension (max_batch_size > 0)."""

    def data_type(spec: TensorSpec) -> int:
        return pb.DataType.Value(f"TYPE_{oip_datatype(spec)}")

    config = pb.ModelConfig(
        name=version.model,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=batching.max_batch_size,
        input=[
            pb.ModelInput(name=s.name, data_type=data_type(s), dims=list(s.shape[1:]))
            for s in module_class.inputs
        ],
        output=[
            pb.ModelOutput(name=s.name, data_type=data_type(s), dims=list(s.shape[1:]))
            for s in module_class.outputs
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=batching.preferred_batch_sizes,
            max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
            default_queue_policy=pb.ModelQueuePolicy(max_queue_size=batching.max_queue_size),
        ),
    )
    for key, value in (
        ("module_class", module_class.import_path),
        ("class_name", module_class.name),
        ("version", str(version.version)),
        ("digest", f"sha256:{version.digest}"),
        # Loaded versions only: where forward passes run, and what decided it (compute=auto).
        ("compute", compute),
        ("forward_ms_at_max_batch", "" if forward_ms is None else f"{forward_ms:.3f}"),
    ):
        if not value:
            continue
        config.parameters[key].string_value = value
    return pb.ModelConfigResponse(config=config)


def statistics_to_pb(name: str, version: int, stats: BatcherStats) -> pb.ModelStatistics:
    """One model version's counters in Triton's statistics message."""

    def duration(count: int, ns: int) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=ns)

    computed = stats.success
    return pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.rows,
        execution_count=stats.batches,
        inference_stats=pb.InferStatistics(
            success=duration(stats.success, stats.success_ns),
            fail=duration(stats.fail, stats.fail_ns),
            queue=duration(computed, stats.queue_ns),
            compute_input=duration(computed, stats.compute_input_ns),
            compute_infer=duration(computed, stats.compute_infer_ns),
            compute_output=duration(computed, stats.compute_output_ns),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size, compute_infer=duration(count, stats.batch_infer_ns[size])
            )
            for size, count in sorted(stats.batch_sizes.items())
        ],
    )
