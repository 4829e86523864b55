"""Jobs client pieces that need no server: renderers, pb converters, upload chunks, following."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from moduleserve.client.cli import main
from moduleserve.client.errors import AlreadyExistsError, UnavailableError, from_rpc_error
from moduleserve.client.jobs import (
    DatasetInfo,
    JobEventInfo,
    JobInfo,
    JobsClient,
    dataset_from_pb,
    event_from_pb,
    job_from_pb,
    prepare_tensors,
    spec_to_pb,
    upload_requests,
)
from moduleserve.client.jobs_cli import follow
from moduleserve.client.jobs_render import (
    format_event,
    format_progress,
    format_summary,
    loss_series,
    plot_curves,
)
from moduleserve.client.pb import moduleserve_v1_pb2 as pb

AT = 1_795_893_662.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _event(**fields: Any) -> JobEventInfo:
    values: dict[str, Any] = {
        "job_id": "j1",
        "seq": 1,
        "at": AT,
        "kind": "progress",
        "state": "",
        "message": "",
        "epoch": 1,
        "epochs": 3,
        "step": 10,
        "total_steps": 60,
        "loss": 0.6931,
        "val_loss": None,
        "learning_rate": 0.001,
        "examples_per_second": 412.4,
        "eta_seconds": 65.0,
        "attempt": 1,
    }
    return JobEventInfo(**{**values, **fields})


def _job_pb(**fields: Any) -> pb.Job:
    values: dict[str, Any] = {
        "id": "j1",
        "model": "mlp",
        "base_version": 2,
        "dataset": "pairs",
        "state": pb.JOB_STATE_SUCCEEDED,
        "created_at": AT,
        "result_version": 3,
    }
    return pb.Job(**{**values, **fields})


def _grid(text: str) -> list[str]:
    """The plot's grid rows, without the y labels and the axis bar."""
    return [line.split("|", 1)[1] for line in text.splitlines() if "|" in line]


# -- plot_curves -----------------------------------------------------------------------------


def test_a_falling_series_runs_from_the_top_left_to_the_bottom_right() -> None:
    text = plot_curves({"train loss": [(0, 4.0), (1, 3.0), (2, 2.0), (3, 1.0)]}, width=10, height=4)
    rows = _grid(text)
    assert len(rows) == 4
    assert [row.index("*") for row in rows] == [0, 3, 6, 9]
    assert [row.count("*") for row in rows] == [1, 1, 1, 1]


def test_the_y_labels_show_the_range_and_the_legend_names_each_mark() -> None:
    series = {"train loss": [(0, 2.0), (10, 1.0)], "val loss": [(10, 1.5)]}
    lines = plot_curves(series, width=20, height=5).splitlines()
    assert lines[0].split("|")[0].strip() == "2"
    assert lines[2].split("|")[0].strip() == "1.5"
    assert lines[4].split("|")[0].strip() == "1"
    assert lines[2].split("|")[1].rstrip().endswith("o")  # val loss at x=10, y=1.5
    assert "* train loss" in lines[-1] and "o val loss" in lines[-1]
    assert lines[-2].split() == ["0", "10", "step"]


def test_plotting_nothing_or_a_flat_curve_does_not_fail() -> None:
    assert "no loss values" in plot_curves({})
    rows = _grid(plot_curves({"train loss": [(1, 0.5), (2, 0.5)]}, width=8, height=5))
    assert rows[2].strip() == "*      *"  # centred


# -- progress and log lines ------------------------------------------------------------------


def test_the_progress_line_has_epoch_step_bar_losses_speed_and_eta() -> None:
    line = format_progress(_event(), val_loss=0.7012)
    assert line.startswith("epoch 1/3  step 10/60  [###.................]")
    for part in ("17%", "loss 0.6931", "val loss 0.7012", "412 ex/s", "ETA 1m05s"):
        assert part in line


def test_a_progress_event_is_one_log_line() -> None:
    expected = f"{_stamp(AT)} [epoch 1/3] step 10/60 loss 0.6931 lr 0.001 412 ex/s"
    assert format_event(_event()) == expected


def test_state_epoch_and_log_events_say_what_happened() -> None:
    state = _event(kind="state", state="running", attempt=2, message="resumed", epochs=0)
    assert format_event(state) == f"{_stamp(AT)} running (attempt 2): resumed"
    epoch = _event(kind="epoch", loss=0.5, val_loss=0.625)
    assert format_event(epoch).endswith("[epoch 1/3] finished: train loss 0.5000 val loss 0.6250")
    log = _event(kind="log", message="moved alias prod", epochs=0)
    assert format_event(log) == f"{_stamp(AT)} moved alias prod"


def test_the_summary_names_the_result_or_the_reason() -> None:
    done = job_from_pb(_job_pb(alias="prod", alias_moved=True))
    assert format_summary(done) == "job j1 succeeded: registered mlp:3 and moved alias prod"
    failed = job_from_pb(_job_pb(state=pb.JOB_STATE_FAILED, result_version=0, reason="NaN"))
    assert format_summary(failed) == "job j1 failed: NaN"


# -- pb -> dataclasses -------------------------------------------------------------------------


def test_a_job_message_becomes_a_job_info() -> None:
    message = _job_pb(
        spec=pb.JobSpec(optimizer="sgd", epochs=3, freeze=["fc1.*"]),
        epochs=[
            pb.JobEpoch(epoch=1, train_loss=0.9, val_loss=0.8, checkpoint=True, finished_at=AT),
            pb.JobEpoch(epoch=2, train_loss=0.7, finished_at=AT + 1),
        ],
        best_epoch=1,
        progress=pb.JobEvent(job_id="j1", seq=7, kind=pb.JOB_EVENT_KIND_PROGRESS, loss=0.7),
        metrics={"val_loss": 0.8},
        alias="prod",
    )
    job = job_from_pb(message)
    assert (job.state, job.result_version, job.started_at, job.finished_at) == (
        "succeeded",
        3,
        None,
        None,
    )
    assert job.spec["optimizer"] == "sgd" and job.spec["freeze"] == ["fc1.*"]
    assert "learning_rate" not in job.spec  # optional and unset: the server's default
    assert [e.val_loss for e in job.epochs] == [0.8, None]
    assert job.progress is not None and job.progress.kind == "progress"
    assert job.progress.val_loss is None and job.progress.state == ""
    assert json.loads(json.dumps(job.to_dict()))["epochs"][0]["checkpoint"] is True


def test_an_unfinished_job_has_no_result_version_and_no_progress() -> None:
    job = job_from_pb(_job_pb(state=pb.JOB_STATE_QUEUED, result_version=0))
    assert (job.state, job.result_version, job.progress) == ("queued", None, None)


def test_event_and_dataset_messages_become_dataclasses() -> None:
    event = event_from_pb(
        pb.JobEvent(job_id="j1", seq=2, kind=pb.JOB_EVENT_KIND_STATE, state=pb.JOB_STATE_FAILED)
    )
    assert (event.kind, event.state, event.loss) == ("state", "failed", None)
    tensors = [pb.DatasetTensor(name="x", dtype="float32", shape=[10, 4])]
    dataset = dataset_from_pb(pb.Dataset(name="d", digest="ab", size=160, tensors=tensors))
    assert dataset == DatasetInfo(
        "d", "ab", 160, {"x": {"dtype": "float32", "shape": [10, 4]}}, "", None
    )


def test_only_the_hyperparameters_given_are_set() -> None:
    spec = spec_to_pb({"epochs": 3, "learning_rate": 0.01, "freeze": ["a.*"], "seed": None})
    assert sorted(f.name for f, _ in spec.ListFields()) == ["epochs", "freeze", "learning_rate"]
    assert not spec.HasField("batch_size")
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*lr"):
        spec_to_pb({"lr": 0.1})
    with pytest.raises(ValueError, match="hyperparameter epochs"):
        spec_to_pb({"epochs": "three"})


def test_the_new_status_codes_have_typed_errors() -> None:
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.ALREADY_EXISTS

        def details(self) -> str:
            return "dataset 'd' already exists"

    assert isinstance(from_rpc_error(Failed()), AlreadyExistsError)


# -- upload chunks -------------------------------------------------------------------------


def test_upload_chunks_stay_under_the_limit_and_rebuild_the_tensors() -> None:
    inputs = np.arange(800, dtype=np.float32).reshape(200, 4)
    targets = np.arange(50, dtype=np.int64)
    requests = list(upload_requests("d", prepare_tensors({"x": inputs, "y": targets}), "", 1024))
    header = requests[0].header
    assert [(t.name, t.dtype, list(t.shape)) for t in header.tensors] == [
        ("x", "float32", [200, 4]),
        ("y", "int64", [50]),
    ]
    chunks = [r.chunk for r in requests[1:]]
    assert all(r.WhichOneof("part") == "chunk" for r in requests[1:])
    assert max(len(c) for c in chunks) <= 1024
    assert sum(len(c) for c in chunks) >= 3 * 1024
    assert b"".join(chunks) == inputs.tobytes() + targets.tobytes()


def test_uploads_send_c_order_little_endian_bytes() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3).T  # transposed: not C-contiguous
    (tensor,) = prepare_tensors({"x": big_endian})
    assert (tensor.dtype, tensor.shape) == ("int32", (3, 2))
    assert bytes(tensor.data) == np.ascontiguousarray(big_endian, dtype="<i4").tobytes()
    with pytest.raises(ValueError, match="tensor 'z': dtype complex64"):
        prepare_tensors({"z": np.zeros(2, dtype=np.complex64)})


def test_torch_tensors_upload_with_torch_dtype_names() -> None:
    torch = pytest.importorskip("torch")
    values = torch.tensor([[1.0, -2.5]], dtype=torch.bfloat16)
    (tensor,) = prepare_tensors({"w": values})
    assert (tensor.dtype, tensor.shape) == ("bfloat16", (1, 2))
    assert bytes(tensor.data) == values.view(torch.int16).numpy().tobytes()


# -- the client over a fake channel ----------------------------------------------------------


class FakeCall:
    """A server-streaming call that yields messages and records its cancellation."""

    def __init__(self, messages: list[pb.JobEvent]) -> None:
        self.messages, self.cancelled = messages, False

    def __iter__(self) -> Iterator[pb.JobEvent]:
        return iter(self.messages)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeChannel:
    """Answers WatchJob with `call` and UploadDataset by reading every request."""

    def __init__(self, call: FakeCall) -> None:
        self.call = call
        self.uploaded: list[pb.UploadDatasetRequest] = []

    def unary_unary(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return lambda *a, **k: None

    def unary_stream(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return lambda *a, **k: self.call

    def stream_unary(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        def upload(requests: Iterator[pb.UploadDatasetRequest], **_: Any) -> Any:
            self.uploaded.extend(requests)
            return pb.UploadDatasetResponse(dataset=pb.Dataset(name="d", size=8))

        return upload


def test_closing_a_watch_cancels_its_rpc() -> None:
    call = FakeCall([pb.JobEvent(job_id="j1", seq=1), pb.JobEvent(job_id="j1", seq=2)])
    events = JobsClient(FakeChannel(call)).watch("j1")  # type: ignore[arg-type]  # fake
    assert next(events).seq == 1
    events.close()
    assert call.cancelled


def test_upload_dataset_streams_the_header_then_the_chunks() -> None:
    channel = FakeChannel(FakeCall([]))
    jobs = JobsClient(channel)  # type: ignore[arg-type]  # fake
    info = jobs.upload_dataset("d", {"x": np.zeros(4, dtype=np.int16)}, chunk_bytes=3)
    assert info.name == "d"
    assert [r.WhichOneof("part") for r in channel.uploaded] == ["header", "chunk", "chunk", "chunk"]


# -- following a job -----------------------------------------------------------------------


class FlakyJobs:
    """Watch streams that break once after three events; get reports the job finished."""

    def __init__(self) -> None:
        self.after_seqs: list[int] = []

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[JobEventInfo]:
        self.after_seqs.append(after_seq)
        for seq in range(after_seq + 1, 6):
            if seq == 4 and len(self.after_seqs) == 1:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "socket closed")
            yield _event(seq=seq)

    def get(self, job_id: str) -> JobInfo:
        return job_from_pb(_job_pb(id=job_id))


def test_following_resumes_a_broken_stream_after_the_last_event() -> None:
    jobs, seen, sleeps = FlakyJobs(), list[int](), list[float]()
    job = follow(jobs, "j1", lambda e: seen.append(e.seq), sleep=sleeps.append)  # type: ignore[arg-type]  # fake
    assert (job.state, seen, jobs.after_seqs, sleeps) == (
        "succeeded",
        [1, 2, 3, 4, 5],
        [0, 3],
        [0.5],
    )


def test_following_an_unreachable_server_fails_at_once() -> None:
    class Down(FlakyJobs):
        def watch(self, job_id: str, after_seq: int = 0) -> Iterator[JobEventInfo]:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "connection refused")
            yield  # a generator, like the real one

    with pytest.raises(UnavailableError):
        follow(Down(), "j1", print, sleep=pytest.fail)  # type: ignore[arg-type]  # fake


def test_loss_series_puts_validation_at_each_epoch_last_step() -> None:
    events = [
        _event(seq=1, step=5, loss=1.0),
        _event(seq=2, step=10, loss=0.8),
        _event(seq=3, kind="epoch", step=10, loss=0.8, val_loss=0.9),
        _event(seq=4, epoch=2, step=15, loss=0.6),
    ]
    job = job_from_pb(_job_pb(epochs=[pb.JobEpoch(epoch=1, train_loss=0.8, val_loss=0.9)]))
    assert loss_series(job, events) == {
        "train loss": [(5.0, 1.0), (10.0, 0.8), (15.0, 0.6)],
        "val loss": [(10.0, 0.9)],
    }


def test_plotting_to_png_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    # Fails before any call, so the unreachable target is never dialled.
    code = main(["--target", "127.0.0.1:1", "jobs", "show", "j1", "--plot", "curves.png"])
    assert code == 1
    expected = "error: writing a PNG needs matplotlib: pip install 'moduleserve[plot]'\n"
    assert capsys.readouterr().err == expected
