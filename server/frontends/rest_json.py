"""DataPlane answers -> the V2 REST JSON bodies (metadata, config, statistics, index).

Metadata, config and statistics go through the same protobuf builders as the gRPC codec
(`convert_meta.py`), then through `message_to_json`: both protocols then say the same
thing, and Triton's REST shapes are its protobuf messages in JSON anyway.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from moduleserve.server.convert_meta import (
    model_config_to_pb,
    model_metadata_to_pb,
    statistics_to_pb,
)
from moduleserve.server.dataplane import (
    IndexEntry,
    ModelConfig,
    ModelMetadata,
    ModelStats,
    ServerMetadata,
)

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as Triton writes it over REST: proto field names, enum names, 64-bit integers
    as JSON numbers (protobuf's own json_format writes them as strings), and every scalar
    and repeated field present even at its default (a count of 0 is still a count)."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            result[field.name] = [_value(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            continue  # an unset sub-message or oneof member: absent, as in protobuf's JSON
        else:
            result[field.name] = _value(field, value)
    return result


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        found = field.enum_type.values_by_number.get(value)
        return found.name if found is not None else value
    if field.type in _INT64:
        return int(value)
    return value


def server_metadata_json(meta: ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def model_metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    return message_to_json(model_metadata_to_pb(meta.model, meta.module_class))


def model_config_json(config: ModelConfig) -> dict[str, Any]:
    """The config object itself, not wrapped in {"config": …}: Triton's REST answer."""
    response = model_config_to_pb(config.version, config.module_class, config.batching)
    return message_to_json(response.config)


def statistics_json(stats: list[ModelStats]) -> dict[str, Any]:
    return {
        "model_stats": [
            message_to_json(statistics_to_pb(s.model, s.version, s.stats)) for s in stats
        ]
    }


def index_json(entries: list[IndexEntry]) -> list[dict[str, Any]]:
    """Triton's index body: a bare JSON array of {name, version, state, reason}."""
    return [
        {"name": e.model, "version": str(e.version), "state": e.state, "reason": e.reason}
        for e in entries
    ]
