"""Module classes only the tests use (registered under the `tests.models` prefix)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn


class Doubler(nn.Module):
    """y = 2x + 1 exactly, for batching tests with exact answers."""

    def __init__(self, features: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(features) * 2.0)
            self.linear.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SlowNet(nn.Module):
    """Sleeps in forward (seconds given by kwargs), to prove the event loop stays free."""

    def __init__(self, delay_s: float = 0.5) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            time.sleep(self.delay_s)
        return self.linear(x)


class Wide(nn.Module):
    """A large model (features x features float32) for memory tests."""

    def __init__(self, features: int = 4096, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(features, features) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class WithNonPersistentBuffer(nn.Module):
    """Keeps a buffer outside its state_dict: a meta build cannot fill it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class BrokenWarmup(nn.Module):
    """Fails every real forward pass (the meta-device check at registration passes)."""

    def __init__(self, features: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            raise RuntimeError("this model cannot run")
        return self.linear(x)


class NanHater(nn.Module):
    """Raises inside forward() on NaN input: an unexpected server-side failure."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta and torch.isnan(x).any():
            raise RuntimeError("NaN reached a layer that cannot take it")
        return self.linear(x)


class IntDoubler(Doubler):
    """Doubler for integer inputs: y = 2x + 1 in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float())


class FirstRowOnly(nn.Module):
    """Returns one row whatever it is given, but only outside the meta device, where the
    registration check runs: push's real forward pass must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if x.is_meta else out[:1]


class RowSum(nn.Module):
    """Sums over the batch: its output has no row per input row."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).sum(dim=0)


class DropsLastRow(nn.Module):
    """Drops the last output row of a real batch of three rows or more: a model whose
    outputs break the one-row-per-input-row rule only where no meta-device probe, warm-up
    (one row) or small request looks."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y[:-1] if not x.is_meta and x.shape[0] >= 3 else y


@dataclass
class Gate:
    """Where a test holds a `Gated` model's forward passes: `entered` is set when one waits,
    and it returns once `release` is set."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


GATES: dict[str, Gate] = {}


def gate(name: str) -> Gate:
    """The gate of that name (created closed), shared by the test and the server it runs in
    this process (ServerThread)."""
    return GATES.setdefault(name, Gate())


class Gated(nn.Module):
    """y = x (features wide), but a real forward pass over a non-zero input waits at its gate
    until the test opens it: a request held in flight exactly as long as a test needs. The
    server's warm-up and timed passes send zeros and never wait. Serve it with
    compute="thread": held inline, it would hold the event loop too."""

    def __init__(self, gate: str = "gate", features: int = 2) -> None:
        super().__init__()
        self.gate = gate
        self.linear = nn.Linear(features, features)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(features))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta and bool(x.any()):
            held = gate(self.gate)
            held.entered.set()
            if not held.release.wait(30):
                raise RuntimeError(f"gate {self.gate!r} was never opened")
        return self.linear(x)
