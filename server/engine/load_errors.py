"""What clients learn of a failed model load, and what only the server log keeps."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moduleserve.registry.entities import Version
from moduleserve.registry.errors import ClassNotAllowedError, StateDictMismatchError, shorten
from moduleserve.server.errors import (
    CheckpointMismatchError,
    ModelClassNotAllowedError,
    ModelLoadingError,
)

logger = logging.getLogger(__name__)

SEE_LOG = "details in the server log"
Key = tuple[str, int]


@dataclass(frozen=True)
class LoadFailure:
    """Why a version failed to load: the facts, not the exception, whose traceback would
    hold the frames (and requests) of whoever raised it last."""

    kind: type[ModelLoadingError]
    reason: str
    retry_at: float

    def error(self, key: Key) -> ModelLoadingError:
        """A fresh exception for one more caller."""
        return self.kind(key[0], str(key[1]), self.reason)


def load_error(version: Version, exc: Exception) -> ModelLoadingError:
    """What clients learn of a failed build: our own errors' facts, never user-code text."""
    name, number = version.model, str(version.version)
    if isinstance(exc, ClassNotAllowedError):
        logger.warning("cannot load %s:%s: %s", name, number, exc)
        return ModelClassNotAllowedError(
            name,
            number,
            f"cannot be loaded: its class {version.class_name!r} is outside this server's "
            "allowed class prefixes",
        )
    if isinstance(exc, StateDictMismatchError):
        logger.warning("cannot load %s:%s: %s", name, number, exc)
        return CheckpointMismatchError(name, number, f"cannot be loaded: {shorten(exc, 400)}")
    logger.warning("could not load %s:%s", name, number, exc_info=exc)
    return ModelLoadingError(
        name, number, f"failed to load: its class could not be imported or built ({SEE_LOG})"
    )
