"""SIGKILL during a push never leaves a version pointing at a missing or partial blob."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from tests.helpers import subprocess_env

# A 64 MiB checkpoint: the write takes long enough to be caught in the middle.
PUSH_FOREVER = """
import sys, torch
from moduleserve.registry.api import Registry
from moduleserve.registry.config import RegistrySettings
r = Registry(RegistrySettings())
torch.manual_seed(int(sys.argv[1]))
while True:
    r.push('wide', {'layers.0.weight': torch.randn(4096, 4096),
                    'layers.0.bias': torch.randn(4096)})
"""


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _assert_consistent(registry: Registry) -> None:
    assert registry.verify() == []
    referenced = set(registry.referenced_digests())
    for digest in registry.blobs.digests():
        assert registry.blobs.check(digest) is None  # no partial file under a final name
    assert referenced <= set(registry.blobs.digests())


@pytest.fixture
def wide(sqlite_registry: Registry) -> Registry:
    sqlite_registry.classes.register(
        "Wide", "tests.models:Wide", {"layers": 1}, [parse_input_spec("x:float32:-1,4096")]
    )
    sqlite_registry.push(
        "wide",
        {"layers.0.weight": torch.zeros(4096, 4096), "layers.0.bias": torch.zeros(4096)},
        class_name="Wide",
    )
    return sqlite_registry


def _pusher(registry: Registry, seed: int) -> subprocess.Popen:
    env = subprocess_env(registry.settings.database_url(), registry.settings.store)
    return subprocess.Popen(
        [sys.executable, "-c", PUSH_FOREVER, str(seed)], env=env, stderr=subprocess.PIPE, text=True
    )


def test_kill_while_the_blob_is_being_written(wide: Registry) -> None:
    tmp = wide.settings.store / "tmp"
    proc = _pusher(wide, seed=1)
    _kill_when(proc, lambda: tmp.is_dir() and any(tmp.iterdir()))
    _assert_consistent(wide)
    assert wide.checkpoints.get_model("wide").versions == (1,)
    # The partial temp file is the only leftover, and gc removes it.
    report = wide.gc(min_age_s=0)
    assert report.temp_files and not any(tmp.iterdir())


def test_kill_between_blob_and_row_commit(wide: Registry) -> None:
    before = set(wide.blobs.digests())
    proc = _pusher(wide, seed=2)
    _kill_when(proc, lambda: set(wide.blobs.digests()) != before)
    _assert_consistent(wide)
    # Whether or not the row made it, nothing points at a missing blob, and an
    # unreferenced blob is only garbage for gc.
    versions = wide.checkpoints.get_model("wide").versions
    assert versions in ((1,), (1, 2))
    wide.gc(min_age_s=0)
    _assert_consistent(wide)


def test_kill_at_many_points_in_a_stream_of_pushes(wide: Registry) -> None:
    for seed, delay in enumerate((0.5, 1.0, 1.5, 2.5), start=3):
        proc = _pusher(wide, seed=seed)
        started = time.monotonic()
        _kill_when(proc, lambda s=started, d=delay: time.monotonic() - s > d)
        _assert_consistent(wide)


def test_stale_temp_file_is_not_mistaken_for_a_blob(wide: Registry) -> None:
    tmp = wide.settings.store / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "abc.part").write_bytes(b"partial")
    _assert_consistent(wide)
    assert wide.gc(min_age_s=3600).temp_files == ()
