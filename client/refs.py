"""Model references: `MODEL[:VERSION|:ALIAS]`. No numpy or gRPC here: the registry splits
references too, and its light users (an idle job worker, admin commands) should not pay for
the client's imports."""

from __future__ import annotations


def split_ref(text: str) -> tuple[str, str]:
    """ "mlp:2" → ("mlp", "2"); "mlp" → ("mlp", "") (the default version). The one place a
    `MODEL[:VERSION|:ALIAS]` reference is split; nothing is checked here."""
    model, _, version = text.partition(":")
    return model, version
