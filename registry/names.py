"""Name rules for models, classes, datasets and aliases, and `MODEL:REF` parsing."""

from __future__ import annotations

import re

from registry.errors import InvalidInputError, InvalidNameError

# Names end up in file paths, URLs and CLI arguments: keep them to a safe alphabet.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Aliases start with a letter so that `mynet:3` is always a version and `mynet:prod` an alias.
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
ALIAS_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter"


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid model/class/dataset name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(kind, str(name), NAME_RULE)
    return name


def check_alias(alias: str) -> str:
    """Return `alias` if it is a valid alias name, else raise InvalidNameError."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias) or ".." in alias:
        raise InvalidNameError("alias", str(alias), ALIAS_RULE)
    return alias


def split_ref(text: str) -> tuple[str, str]:
    """Split `MODEL[:VERSION|:ALIAS]` into (model, ref); ref is "" when absent."""
    model, _, ref = text.partition(":")
    check_name("model", model)
    if ref and not ref.isdigit():
        check_alias(ref)
    return model, ref


def parse_version(text: str) -> int:
    """Parse a version number (1, 2, 3…)."""
    if not text.isdigit() or int(text) < 1:
        raise InvalidInputError(f"invalid version {text!r}: versions are whole numbers from 1")
    return int(text)
