"""Server settings: one object built from flags and MODULESERVE_* variables, passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from moduleserve.registry.config import RegistrySettings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class BatchingSettings(BaseModel):
    """Dynamic batching knobs (Triton's names), global or per model."""

    max_batch_size: int = Field(32, gt=0)
    """Most rows one forward pass takes; larger requests are refused."""

    max_queue_delay_ms: float = Field(2.0, ge=0)
    """Longest a batch waits for more requests once there is load (a lone request never waits)."""

    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Stop collecting once a batch reaches one of these sizes."""

    max_queue_size: int = Field(1024, gt=0)
    """Requests waiting per model before new ones get RESOURCE_EXHAUSTED."""


class JobWorkerSettings(RegistrySettings):
    """How fine-tuning workers run: shared by `moduleserve-worker` and the server's workers."""

    job_device: str = "auto"
    """Where jobs train: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    job_torch_threads: int = Field(1, gt=0)
    """Intra-op threads of training, kept apart from inference's so serving keeps its latency."""

    job_nice: int = Field(10, ge=0, le=19)
    """How much lower the worker's CPU priority is than the server's (Unix nice increment)."""

    job_lease_s: float = Field(30.0, gt=0)
    """A running job's lease; a worker renews it every few seconds, and another worker takes
    the job once it has expired (its worker died)."""

    job_poll_s: float = Field(1.0, gt=0)
    """How often an idle worker looks for queued jobs."""

    job_max_attempts: int = Field(3, ge=1)
    """A job whose worker died this many times is failed instead of taken again."""

    log_format: Literal["plain", "json"] = "plain"
    """Log line format on stderr."""

    log_level: str = "INFO"
    """Root log level."""


class WorkerSettings(JobWorkerSettings):
    """Everything `moduleserve-worker` can be told (flags override environment)."""

    worker_id: str = ""
    """Name recorded on the jobs this worker runs; default host:pid."""


class ServerSettings(JobWorkerSettings):
    """Everything `moduleserve-server` can be told (flags override environment)."""

    job_workers: int = Field(1, ge=0)
    """Fine-tuning worker processes the server starts and restarts (0: none; run
    `moduleserve-worker` elsewhere). SQLite registries take one."""

    read_tokens: list[str] = Field(default_factory=list)
    """Bearer tokens accepted for reads (weights, registry, jobs, inference; security.py's
    table); empty: reads need no token."""

    frontend: Literal["auto", "envoy", "grpc"] = "auto"
    """What speaks the wire: `envoy` (gRPC and KServe V2 REST on one port, HTTP/2 in
    compiled code), `grpc` (grpc.aio: gRPC only, the fallback where Envoy's wheel does not
    install), `auto` (Envoy when installed)."""

    host: str = "127.0.0.1"
    """Address to listen on; a non-loopback one needs tokens or --insecure."""

    grpc_port: int = Field(8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one (tests)."""

    metrics_port: int | None = Field(8002, ge=0, le=65535)
    """Prometheus metrics HTTP port; 0 picks a free one, None (--no-metrics) disables it."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Floating-point precision of inference (half types only on CUDA)."""

    compute: Literal["auto", "inline", "thread"] = "auto"
    """Where forward passes run: `thread` on the device's compute thread; `inline` on the
    event loop (no thread hand-off; it stalls everything else for a forward pass's length);
    `auto` inline for a model whose forward pass at max_batch_size is measured at load to
    be under 1 ms on CPU, else the thread (always the thread on CUDA)."""

    torch_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), gt=0)
    """Intra-op threads of forward passes; the default leaves half the cores to gRPC, since
    torch's spinning worker threads otherwise starve the event loop on small machines."""

    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    """Batching defaults for every model."""

    model_batching: dict[str, BatchingSettings] = Field(default_factory=dict)
    """Per-model overrides, e.g. {"mlp": {"max_batch_size": 64}}."""

    memory_budget_mb: float = Field(4096, gt=0)
    """Weights the cache may hold; least recently used models are unloaded beyond it."""

    load: list[str] = Field(default_factory=list)
    """Models (`name`, `name:version` or `name:alias`) loaded and warmed up before the server
    reports ready, instead of on their first request. A model that does not load fails the
    start."""

    load_all: bool = False
    """Load every model of the registry at its default version (the default alias, else the
    latest) before reporting ready, as Triton does by default."""

    preload: list[str] = Field(default_factory=list)
    """Deprecated: the former name of `load` (--preload, MODULESERVE_PRELOAD, `preload` in
    moduleserve.toml), still added to it for this release."""

    alias_refresh_s: float = Field(2.0, gt=0)
    """How often aliases of loaded models are re-read, to pick up moves without a restart."""

    max_message_mb: int = Field(64, gt=0, le=2048)
    """gRPC send/receive limit. gRPC's own 4 MiB is too small for real tensors, while each
    request in flight may hold about this much memory: 64 MiB takes a batch of 32 RGB
    224x224 FP32 images (19 MiB) three times over; raise it for larger inputs."""

    lazy_load: bool = True
    """Load a model on its first inference request. Off (--no-lazy-load), only
    RepositoryModelLoad (`moduleserve load`, which needs a token when tokens are set),
    --load and --load-all load models, so anonymous requests cannot load or evict any."""

    shutdown_grace_s: float = Field(10.0, ge=0)
    """How long in-flight requests may finish after SIGTERM."""

    tokens: list[str] = Field(default_factory=list)
    """Admin bearer tokens: accepted by every call, and the only ones mutating calls accept
    (with read tokens but none of these, nothing can mutate over the wire); empty, with no
    read tokens either: no call needs a token."""

    token_file: Path | None = None
    """File of more `tokens`, one per line (blank lines and `#` comments skipped): unlike
    --token, it keeps them out of `ps` and the environment."""

    read_token_file: Path | None = None
    """File of more `read_tokens`, in the token_file format."""

    insecure: bool = False
    """Allow a non-loopback address with no tokens."""

    tls_cert: Path | None = None
    """PEM certificate chain; with tls_key, the port speaks TLS."""

    tls_key: Path | None = None
    """PEM private key for tls_cert."""

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        self.load = list(dict.fromkeys([*self.load, *self.preload]))
        self.tokens = [*self.tokens, *read_token_file(self.token_file, "--token-file")]
        self.read_tokens = [
            *self.read_tokens,
            *read_token_file(self.read_token_file, "--read-token-file"),
        ]
        if any(not token.strip() for token in [*self.tokens, *self.read_tokens]):
            raise ValueError("tokens must not be empty (an unset variable in --token?)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.host not in LOOPBACK_HOSTS and not self.tokens and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host} without tokens: set MODULESERVE_TOKENS "
                "or pass --insecure"
            )
        if self.job_workers > 1 and self.database_url().startswith("sqlite"):
            raise ValueError(
                "a SQLite registry takes one job worker: use --job-workers 1, or PostgreSQL "
                "for several"
            )
        if self.dtype != "float32" and self.device == "cpu":
            raise ValueError(f"--dtype {self.dtype} needs a CUDA device")
        return self

    def batching_for(self, model: str) -> BatchingSettings:
        """The batching settings of one model (its override, else the defaults)."""
        return self.model_batching.get(model, self.batching)


def read_token_file(path: Path | None, flag: str) -> list[str]:
    """The tokens in `path` (none when no file is given); ValueError when it has none."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise ValueError(f"cannot read the token file {path} ({flag}): {reason}") from None
    tokens = [line.strip() for line in lines]
    tokens = [token for token in tokens if token and not token.startswith("#")]
    if not tokens:
        raise ValueError(f"the token file {path} ({flag}) holds no tokens: one per line")
    return tokens


def settings_error_text(exc: Exception) -> str:
    """The first problem of invalid settings as one line (field: message)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")  # pydantic's label, not ours
        return f"{where}: {message}" if where else message
    return str(exc)
