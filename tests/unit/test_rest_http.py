"""The REST front end's status table and JSON writer: one decision per domain error."""

from __future__ import annotations

import grpc

from moduleserve.client.pb import oip_v2_pb2 as pb
from moduleserve.registry.errors import InvalidInputError
from moduleserve.server.frontends.rest_http import HTTP_STATUS, HttpError, dumps, error_response
from moduleserve.server.frontends.rest_json import message_to_json
from moduleserve.server.status import STATUS_FOR


def test_every_domain_error_has_an_http_status() -> None:
    for cls, code in STATUS_FOR.items():
        assert code in HTTP_STATUS, f"{cls.__name__} -> {code.name} has no HTTP status"
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


def test_error_response_keeps_sentences_and_hides_the_unexpected() -> None:
    scope = {"method": "GET", "path": "/v2", "headers": [(b"x-request-id", b"r-1")]}
    assert error_response(InvalidInputError("bad thing"), scope) == (400, "bad thing", [])
    assert error_response(HttpError(405, "no", [(b"allow", b"GET")]), scope) == (
        405,
        "no",
        [(b"allow", b"GET")],
    )
    assert error_response(KeyError("secret"), scope) == (500, "internal error (request id r-1)", [])


def test_message_to_json_writes_numbers_defaults_and_enum_names() -> None:
    stats = pb.ModelStatistics(
        name="m",
        version="1",
        inference_count=2**40,
        inference_stats=pb.InferStatistics(fail=pb.StatisticDuration()),
    )
    found = message_to_json(stats)
    assert found["inference_count"] == 2**40 and found["execution_count"] == 0
    assert found["inference_stats"]["fail"] == {"count": 0, "ns": 0}
    assert "success" not in found["inference_stats"]  # an unset message stays absent
    config = pb.ModelConfig(input=[pb.ModelInput(name="x", data_type=pb.TYPE_FP32, dims=[3])])
    config.parameters["k"].string_value = "v"
    found = message_to_json(config)
    assert found["input"][0]["data_type"] == "TYPE_FP32" and found["input"][0]["dims"] == [3]
    assert found["parameters"] == {"k": {"string_value": "v"}}
    assert "dynamic_batching" not in found  # an unset oneof member stays absent


def test_dumps_writes_what_msgspec_cannot_as_the_stdlib_did() -> None:
    # A path an ASGI server decoded with surrogateescape ends up in "no such endpoint: …".
    sentence = {"error": "no such endpoint: /v2/\udcff"}
    assert dumps(sentence) == b'{"error":"no such endpoint: /v2/\\udcff"}'
    assert dumps({"n": 2**70, "s": "é"}) == '{"n":1180591620717411303424,"s":"é"}'.encode()
