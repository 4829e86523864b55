"""Which models a server loads before it reports ready (--load, --load-all), and loading them.

A model that does not load fails the start with one sentence naming it: a server that
reported ready without a model its operator asked for would fail that model's first requests
instead, long after anyone looked at its start.
"""

from __future__ import annotations

import asyncio
import logging

from moduleserve.client.refs import split_ref
from moduleserve.registry.api import Registry
from moduleserve.server.config import ServerSettings
from moduleserve.server.engine.cache import ModelCache

logger = logging.getLogger(__name__)


class StartupLoadError(Exception):
    """A model asked for at start (--load, --load-all) did not load; the start fails."""


async def models_to_load(settings: ServerSettings, registry: Registry) -> list[str]:
    """The refs to load at start: with `load_all`, every model of the registry by name (its
    default version) in name order, then the `load` refs in the order given; each ref once.
    A model with no version yet has nothing to load and is left out of `load_all`."""
    refs: list[str] = []
    if settings.load_all:
        models = await asyncio.to_thread(registry.checkpoints.list_models)
        for model in models:
            if model.versions:
                refs.append(model.name)
            else:
                logger.info("--load-all: model %s has no version yet; nothing to load", model.name)
    refs.extend(settings.load)
    return list(dict.fromkeys(refs))


async def load_at_start(cache: ModelCache, refs: list[str]) -> None:
    """Load and warm up each ref in turn; StartupLoadError names the first that fails."""
    for ref in refs:
        model, version = split_ref(ref)
        try:
            await cache.load(model, version)  # the cache logs each load
        except Exception as exc:  # any reason: not found, bad checkpoint, class not allowed
            raise StartupLoadError(f"cannot load {ref!r} at start: {exc}") from exc
