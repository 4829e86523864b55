"""Inference as a plain function: check inputs against the class's spec, batch, forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moduleserve.server.engine.cache import LoadedModel, ModelCache


async def infer(
    cache: ModelCache,
    model: str,
    ref: str,
    inputs: Mapping[str, torch.Tensor],
    *,
    requested: Sequence[str] = (),
    deadline: float | None = None,
    priority: int = 0,
) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    """Run one request through the model's dynamic batcher; returns the model and outputs."""
    loaded = await cache.get(model, ref)
    plan = loaded.plan  # the specs as parsed at load: nothing is parsed per request
    rows, signature = plan.check(inputs)
    if requested:
        plan.check_requested(requested)
    # Checked here once: the batcher takes the rows and merge key as they are.
    outputs = await loaded.batcher.submit(
        inputs, rows, signature, deadline=deadline, priority=priority
    )
    if requested:
        outputs = {name: outputs[name] for name in requested}
    return loaded, outputs
