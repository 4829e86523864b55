"""Name rules for models, classes, datasets and aliases, and `MODEL:REF` parsing."""

from __future__ import annotations

import re

from moduleserve.client.refs import split_ref
from moduleserve.registry.errors import InvalidInputError, InvalidNameError, shorten
from moduleserve.registry.numbers import InvalidNumberError, parse_int

# Names end up in file paths, URLs and CLI arguments: keep them to a safe alphabet.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Aliases start with a letter so that `mynet:3` is always a version and `mynet:prod` an alias.
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
ALIAS_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter"
# Tells a version from an alias; the number itself is read by registry/numbers.py.
VERSION_PATTERN = re.compile(r"[0-9]+")
# Versions are a 32-bit INTEGER column on PostgreSQL; a larger number can name nothing.
MAX_VERSION = 2**31 - 1
VERSION_RULE = f"versions are whole numbers from 1 to {MAX_VERSION}"
# What error messages quote of a name: a 10 kB name would make a reply clients cannot read.
QUOTED_CHARS = 64


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid model/class/dataset name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError(kind, shorten(name, QUOTED_CHARS), NAME_RULE)
    return name


def check_alias(alias: str) -> str:
    """Return `alias` if it is a valid alias name, else raise InvalidNameError."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias) or ".." in alias:
        raise InvalidNameError("alias", shorten(alias, QUOTED_CHARS), ALIAS_RULE)
    return alias


def parse_model_ref(text: str) -> tuple[str, str]:
    """`MODEL[:VERSION|:ALIAS]` as (model, ref), split by the client's `split_ref`, with both
    parts checked; ref is "" when absent."""
    model, ref = split_ref(text)
    check_name("model", model)
    parse_ref(ref)
    return model, ref


def parse_ref(ref: str | int) -> int | str:
    """The one parser of version refs: a number (1, 2, 3…) as an int, an alias as itself,
    "" (the default) as ""; anything else raises InvalidInputError."""
    if isinstance(ref, bool):  # JSON true is not version 1
        raise InvalidInputError(f"invalid version {ref!r}: {VERSION_RULE}")
    if isinstance(ref, int):
        return check_version(ref)
    if not ref:
        return ""
    if VERSION_PATTERN.fullmatch(ref):
        return parse_version(ref)
    if ALIAS_PATTERN.fullmatch(ref) and ".." not in ref:
        return ref
    raise InvalidInputError(
        f"invalid version {shorten(ref, QUOTED_CHARS)!r}: give a version number (1, 2, 3…) "
        f"or an alias ({ALIAS_RULE})"
    )


def parse_version(text: str) -> int:
    """Parse a version number (1, 2, 3…) written in ASCII digits."""
    try:
        return parse_int(text, "version", 1, MAX_VERSION)
    except InvalidNumberError:
        raise InvalidInputError(
            f"invalid version {shorten(text, QUOTED_CHARS)!r}: {VERSION_RULE}"
        ) from None


def check_version(number: int) -> int:
    """Return `number` if it can be a version, else raise InvalidInputError."""
    if not 1 <= number <= MAX_VERSION:
        raise InvalidInputError(f"invalid version {number}: {VERSION_RULE}")
    return number
