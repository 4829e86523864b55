"""Every setting a server's job workers have reaches them as the server has it: the test
enumerates the settings' fields, so a new one cannot be forgotten on the way."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from moduleserve.server.config import JobWorkerSettings, ServerSettings, WorkerSettings
from moduleserve.server.jobs.supervisor import WorkerProcesses
from moduleserve.server.jobs.worker import SETTINGS_FILE_ENV

# What the worker makes of its command line and environment, printed as JSON: main()'s own
# first step, run in a real child process with the server's arguments and environment.
READ_SETTINGS = (
    "import sys; from moduleserve.server.jobs.worker import build_parser, load_settings; "
    "print(load_settings(build_parser().parse_args(sys.argv[1:])).model_dump_json())"
)


def non_default_values(tmp_path: Path) -> dict[str, Any]:
    """A value other than the default for every field of the workers' settings."""
    config = tmp_path / "moduleserve.toml"
    config.write_text("")
    return {
        "db": f"sqlite:///{tmp_path / 'elsewhere.db'}",
        "store": tmp_path / "blobs",
        "allowed_class_prefixes": ["tests.models", "ownnets"],
        "class_path": [tmp_path / "classes"],
        "default_alias": "live",
        "max_upload_mb": 12.5,
        "busy_timeout_ms": 1234,
        "config_file": config,
        "job_device": "cpu",
        "job_torch_threads": 3,
        "job_nice": 7,
        "job_lease_s": 12.0,
        "job_poll_s": 0.3,
        "job_max_attempts": 9,
        "log_format": "json",
        "log_level": "DEBUG",
    }


def test_every_worker_setting_set_on_the_server_reaches_its_workers(tmp_path: Path) -> None:
    values = non_default_values(tmp_path)
    fields = JobWorkerSettings.model_fields
    assert set(values) == set(fields), "give every worker setting a value in this test"
    for name, info in fields.items():
        assert values[name] != info.get_default(call_default_factory=True), name
    server = ServerSettings(**values, grpc_port=0, metrics_port=None, job_workers=1)
    workers = WorkerProcesses(server, 1)

    args, env = workers.command()
    settings_file = Path(env[SETTINGS_FILE_ENV])
    mode = stat.S_IMODE(settings_file.stat().st_mode)
    program = args.index("moduleserve.server.jobs.worker")
    # Variables the server's environment may still hold: the file, not they, decides.
    stale = {"MODULESERVE_DEFAULT_ALIAS": "production", "MODULESERVE_BUSY_TIMEOUT_MS": "30000"}
    ran = subprocess.run(
        [sys.executable, "-c", READ_SETTINGS, *args[program + 1 :]],
        env={**env, **stale},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert ran.returncode == 0, ran.stderr
    received = WorkerSettings.model_validate(json.loads(ran.stdout))
    for name in fields:
        assert getattr(received, name) == getattr(server, name), name
    assert mode == 0o600  # it names the database, whose URL may hold a password
    assert not settings_file.exists()  # read once, then gone
    asyncio.run(workers.stop())
    assert not settings_file.parent.exists()
