"""bench.h2load's pure parts (h2load's summary, connections x streams) and the Envoy echo
floor it drives (bench.pyvoy_echo), answering a real gRPC call."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

from bench.h2load import parse_output, split
from bench.loadgen import MODEL_INFER
from bench.processes import started
from bench.pyvoy_echo import frame
from moduleserve.server.frontends.envoy import envoy_available

# h2load 1.52's summary of a timing-based run (-D 2 --warm-up-time 1), trimmed.
SUMMARY = """\
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 26941.00 req/s, 3.52MB/s
requests: 53882 total, 53882 started, 53882 done, 53882 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 53882 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 7.04MB (7382018) total, 307.96KB (315348) headers (space savings 95.12%), 7.88MB data
                     min         max         mean         sd        +/- sd
time for request:      514us     10.88ms      2.35ms       910us    76.52%
time for connect:        0us         0us         0us         0us     0.00%
"""


def test_parse_output_reads_rate_counts_and_request_times() -> None:
    out = parse_output(SUMMARY)
    assert out["rps"] == 26941.0
    assert out["requests_succeeded"] == 53882
    assert out["requests_failed"] == 0
    assert out["status_2xx"] == 53882
    assert out["min_ms"] == pytest.approx(0.514)
    assert out["max_ms"] == pytest.approx(10.88)
    assert out["mean_ms"] == pytest.approx(2.35)
    assert out["sd_ms"] == pytest.approx(0.91)


def test_parse_output_refuses_text_without_a_summary() -> None:
    with pytest.raises(ValueError, match="no summary"):
        parse_output("connect error: Connection refused\n")


@pytest.mark.parametrize(
    ("concurrency", "max_connections", "expected"),
    [(1, 4, (1, 1)), (64, 4, (4, 16)), (8, 4, (4, 2)), (6, 4, (3, 2)), (7, 4, (1, 7))],
)
def test_split_gives_connections_times_streams_equal_to_concurrency(
    concurrency: int, max_connections: int, expected: tuple[int, int]
) -> None:
    assert split(concurrency, max_connections) == expected


def test_frame_is_grpc_length_prefixed() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


@pytest.mark.skipif(not envoy_available(), reason="pyvoy/Envoy not installed")
def test_pyvoy_echo_answers_the_fixed_response(tmp_path: Path) -> None:
    response = bytes(range(200))
    (tmp_path / "response").write_bytes(response)
    cmd = [
        sys.executable,
        "-m",
        "bench.pyvoy_echo",
        f"--response-file={tmp_path / 'response'}",
        f"--port-file={tmp_path / 'port'}",
    ]
    with started(cmd, tmp_path / "port", tmp_path / "echo.log") as (_, port, _):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        try:
            assert call(b"any request", timeout=30.0) == response
        finally:
            channel.close()
