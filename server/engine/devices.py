"""Device placement: which device, one compute thread per device, and the forward call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

Compute = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

HALF_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


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


def make_compute(
    module: nn.Module,
    input_names: Sequence[str],
    output_names: Sequence[str],
    device: torch.device,
    half: torch.dtype | None = None,
) -> Compute:
    """A function from named CPU input tensors to named CPU outputs, run in eval mode.

    On CUDA, inputs go through pinned host memory with non-blocking copies, and
    floating-point inputs are cast to `half` when the model runs in half precision;
    outputs come back as float32 so clients see the declared output types.
    """
    on_cuda = device.type == "cuda"
    module.eval()

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        if on_cuda:
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        if half is not None and tensor.is_floating_point():
            tensor = tensor.to(half)
        return tensor

    def compute(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [to_device(inputs[name]) for name in input_names]
        with torch.inference_mode():
            result = module(*args)
        outputs = result if isinstance(result, tuple | list) else (result,)
        if len(outputs) != len(output_names):
            raise RuntimeError(
                f"forward returned {len(outputs)} tensors, the class declares {len(output_names)}"
            )
        return {name: _to_host(out, half) for name, out in zip(output_names, outputs, strict=True)}

    return compute


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
