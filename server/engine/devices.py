"""Device placement: which device, one compute thread per device, and the forward call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from torch import nn

from moduleserve.registry.entities import ModuleClass, Version
from moduleserve.server.errors import ModelOutputError

Compute = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

HALF_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

ComputeMode = Literal["inline", "thread"]

INLINE_MAX_FORWARD_S = 0.001
"""`compute=auto` runs a model inline on the event loop when its forward pass at
max_batch_size takes less than this. Handing a batch to the compute thread and back costs
about 45 us of CPU on one core and a thread wake-up each way (bench.engine, one request at a
time: MyNet 151 vs 105 us per request, MLP 618 vs 572): most of a 20-100 us forward pass,
under a twentieth of a 1 ms one, where inline stops paying. Inline, a forward pass holds the
loop (every other request, health checks) for its whole length: 1 ms is a delay no client
notices, yet several times the batch-32 forward passes of the models that gain most (MyNet
about 0.2 ms here)."""

TIMING_REPEATS = 5
"""Timed forward passes at load under `compute=auto`; their median decides."""


def resolve_device(setting: str) -> torch.device:
    """`auto` → CUDA when present, else CPU; `cuda:N` is checked to exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {setting!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} asked for, but this machine has no CUDA")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {setting!r}: only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {setting!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


class DeviceExecutors:
    """One compute thread per device: forward passes never run on the event loop, and
    one device's passes run one at a time (they would only contend for it anyway)."""

    def __init__(self) -> None:
        self._executors: dict[str, ThreadPoolExecutor] = {}

    def for_device(self, device: torch.device) -> ThreadPoolExecutor:
        """The executor of `device`, created on first use."""
        key = str(device)
        if key not in self._executors:
            self._executors[key] = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{key}")
        return self._executors[key]

    def shutdown(self) -> None:
        """Stop every compute thread after its current pass."""
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._executors.clear()


def choose_compute(
    setting: str, device: torch.device, forward_s: float | None
) -> tuple[ComputeMode, str]:
    """Where a model's forward passes run, and why (for the log): `setting` is the
    server's `compute`; `forward_s` the measured forward pass at max_batch_size, if any."""
    if setting in ("inline", "thread"):
        return setting, f"--compute {setting}"  # type: ignore[return-value]
    if device.type != "cpu":
        # A GPU forward pass waits for the device: never on the loop.
        return "thread", f"on {device}"
    if forward_s is None:
        return "thread", "forward pass not timed"
    verdict = "under" if forward_s < INLINE_MAX_FORWARD_S else "not under"
    mode: ComputeMode = "inline" if forward_s < INLINE_MAX_FORWARD_S else "thread"
    return mode, f"{verdict} {INLINE_MAX_FORWARD_S * 1000:g} ms"


def time_forward(compute: Compute, inputs: Mapping[str, torch.Tensor]) -> float:
    """Median seconds of up to TIMING_REPEATS forward passes (on the calling thread).

    Stops as soon as most passes were too slow for inline (the median is then decided), or
    one took ten times the limit (no noise explains that): a large model's load need not pay
    for the rest."""
    times: list[float] = []
    slow = 0
    with torch.inference_mode():
        for _ in range(TIMING_REPEATS):
            start = time.perf_counter()
            compute(inputs)
            times.append(time.perf_counter() - start)
            slow += times[-1] >= INLINE_MAX_FORWARD_S
            if slow > TIMING_REPEATS // 2 or times[-1] >= 10 * INLINE_MAX_FORWARD_S:
                break
    return statistics.median(times)


def forward_once(compute: Compute, inputs: Mapping[str, torch.Tensor]) -> None:
    """One forward pass as the batcher runs it (the warm-up)."""
    with torch.inference_mode():
        compute(inputs)


def make_compute(
    module: nn.Module,
    module_class: ModuleClass,
    version: Version,
    device: torch.device,
    half: torch.dtype | None = None,
) -> Compute:
    """A function from named CPU input tensors to named CPU outputs, run in eval mode;
    call it under `torch.inference_mode()` (entering it costs each batch a few us).

    What forward() returns is checked against the class's outputs: as many tensors as it
    declares, each with one row per input row along dimension 0 (the batcher splits them
    back into requests by rows); anything else raises `ModelOutputError`, naming the class.

    On CUDA, inputs go through pinned host memory with non-blocking copies, and
    floating-point inputs are cast to `half` when the model runs in half precision;
    outputs come back as float32 so clients see the declared output types.
    """
    on_cuda = device.type == "cuda"
    input_names = [spec.name for spec in module_class.inputs]
    output_names = [spec.name for spec in module_class.outputs]
    module.eval()

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        if on_cuda:
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        if half is not None and tensor.is_floating_point():
            tensor = tensor.to(half)
        return tensor

    def refuse(reason: str) -> ModelOutputError:
        return ModelOutputError(version.model, str(version.version), module_class.name, reason)

    def compute(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [to_device(inputs[name]) for name in input_names]
        result = module(*args)  # callers hold torch.inference_mode (the batcher, warm_up)
        outputs = result if isinstance(result, tuple | list) else (result,)
        if len(outputs) != len(output_names):
            raise refuse(
                f"returned {_count(len(outputs), 'tensor')} from forward(), but declares "
                f"{_count(len(output_names), 'output')} ({', '.join(output_names)})"
            )
        rows = args[0].shape[0]
        for name, out in zip(output_names, outputs, strict=True):
            if not isinstance(out, torch.Tensor):
                raise refuse(f"returned output {name!r} as {type(out).__name__}, not a tensor")
            got = out.shape[0] if out.dim() else None
            if got != rows:
                raise refuse(
                    f"returned output {name!r} with {_count(got, 'row')} for a batch of {rows}; "
                    "forward() must return one row per input row along dimension 0"
                )
        return {name: _to_host(out, half) for name, out in zip(output_names, outputs, strict=True)}

    return compute


def _count(number: int | None, noun: str) -> str:
    """'1 row', '2 rows', 'no rows'."""
    if not number:
        return f"no {noun}s"
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _to_host(tensor: torch.Tensor, half: torch.dtype | None) -> torch.Tensor:
    if half is not None and tensor.dtype == half:
        tensor = tensor.float()
    return tensor.cpu() if tensor.device.type != "cpu" else tensor


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
