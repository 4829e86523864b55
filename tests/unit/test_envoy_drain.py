"""The Envoy launcher's drain against an admin endpoint that fails: a call that got no
answer is not an idle server, so the drain goes on (up to its grace) rather than ending
early and cutting requests still in flight. The admin endpoint is a real HTTP server on
an ephemeral port whose answers each test scripts; the launcher is the real one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from moduleserve.server.frontends.envoy import EnvoyProcess
from tests.helpers import server_settings


class Admin:
    """An Envoy admin endpoint stand-in: answers `/stats` from `answers` in order (the last
    one repeats); a None answer is a 503."""

    def __init__(self, answers: list[str | None], drain_status: int = 200) -> None:
        self.answers = answers
        self.drain_status = drain_status
        self.stats_calls = 0
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # /drain_listeners
                self._reply(admin.drain_status, "OK\n")

            def do_GET(self) -> None:
                index = min(admin.stats_calls, len(admin.answers) - 1)
                admin.stats_calls += 1
                answer = admin.answers[index]
                if answer is None:
                    self._reply(503, "unavailable\n")
                else:
                    self._reply(200, answer)

            def _reply(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def process(tmp_path: Path) -> EnvoyProcess:
    settings = server_settings(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "store")
    return EnvoyProcess(settings, 0, False, tmp_path, 0)  # type: ignore[arg-type]


@pytest.fixture
def admin_factory() -> Iterator[list[Admin]]:
    made: list[Admin] = []
    yield made
    for admin in made:
        admin.close()


ACTIVE = "http.ingress_http.downstream_rq_active: {}\n"


async def drain(process: EnvoyProcess, admin: Admin, grace: float) -> float:
    process.admin = admin.address
    started = time.monotonic()
    await process.drain(grace)
    return time.monotonic() - started


async def test_failed_admin_calls_are_not_idle(
    process: EnvoyProcess, admin_factory: list[Admin]
) -> None:
    admin = Admin([None] * 5 + [ACTIVE.format(0)])
    admin_factory.append(admin)
    elapsed = await drain(process, admin, grace=30)
    assert admin.stats_calls >= 5 + 3  # the failures, then three idle answers
    assert elapsed < 20  # it did end once the count came


async def test_an_admin_that_never_answers_holds_the_drain_for_its_grace_and_warns_once(
    process: EnvoyProcess, admin_factory: list[Admin], caplog: pytest.LogCaptureFixture
) -> None:
    admin = Admin([None])
    admin_factory.append(admin)
    with caplog.at_level(logging.WARNING, logger="moduleserve.server.frontends.envoy"):
        elapsed = await drain(process, admin, grace=1.0)
    assert elapsed >= 1.0
    assert admin.stats_calls > 3
    [warning] = caplog.records
    assert "did not say how many requests are in flight" in warning.getMessage()


async def test_an_unreadable_count_is_not_idle(
    process: EnvoyProcess, admin_factory: list[Admin]
) -> None:
    admin = Admin(["", "no count here\n", "", ACTIVE.format(2), ACTIVE.format(0)])
    admin_factory.append(admin)
    await drain(process, admin, grace=30)
    assert admin.stats_calls >= 4 + 3  # three without a count, one busy, then three idle


async def test_a_failed_listener_drain_still_waits_for_requests_in_flight(
    process: EnvoyProcess, admin_factory: list[Admin], caplog: pytest.LogCaptureFixture
) -> None:
    admin = Admin([ACTIVE.format(1), ACTIVE.format(1), ACTIVE.format(0)], drain_status=503)
    admin_factory.append(admin)
    with caplog.at_level(logging.WARNING, logger="moduleserve.server.frontends.envoy"):
        await drain(process, admin, grace=30)
    assert admin.stats_calls >= 2 + 3
    [warning] = caplog.records
    assert "did not close its port" in warning.getMessage()
