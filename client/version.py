"""The installed package version, for `--version`. No gRPC here: `moduleserve-worker` prints
it too, and an idle worker does not import the client's network stack."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version


def package_version() -> str:
    """The installed moduleserve version ("0+unknown" when run from a tree never installed)."""
    try:
        return distribution_version("moduleserve")
    except PackageNotFoundError:
        return "0+unknown"


def version_text() -> str:
    """What `--version` prints: the program's name and the package version."""
    return f"%(prog)s {package_version()}"
