"""Registry errors: plain classes carrying the facts, never transport status codes."""

from __future__ import annotations

from collections.abc import Sequence


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidInputError(RegistryError):
    """A caller passed something malformed (a name, a file, an argument, a request tensor).

    The one base of every input error: the server's (server/errors.py) subclass it too, so
    INVALID_ARGUMENT is one entry of the status table.
    """


class InvalidNameError(InvalidInputError):
    """A model, class, dataset or alias name breaks the naming rules."""

    def __init__(self, kind: str, name: str, rule: str) -> None:
        super().__init__(f"invalid {kind} name {name!r}: {rule}")
        self.kind, self.name = kind, name


class NotFoundError(RegistryError):
    """Something looked up by name does not exist."""


class ModelNotFoundError(NotFoundError):
    """No model of that name."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} not found")
        self.model = model


class VersionNotFoundError(NotFoundError):
    """The model exists but has no such version or alias."""

    def __init__(self, model: str, ref: str) -> None:
        super().__init__(f"model {model!r} has no version or alias {ref!r}")
        self.model, self.ref = model, ref


class ClassNotFoundError(NotFoundError):
    """No registered Module class of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"module class {name!r} is not registered")
        self.name = name


class DatasetNotFoundError(NotFoundError):
    """No dataset of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"dataset {name!r} not found")
        self.name = name


class AlreadyExistsError(RegistryError):
    """A unique name is taken."""


class ConflictError(RegistryError):
    """The registry's state does not allow the operation (e.g. a compare-and-set lost)."""


class WriteConflictError(ConflictError):
    """A concurrent writer changed the same rows first (e.g. two first pushes of a model)."""


class AliasConflictError(ConflictError):
    """`alias set --expect` found the alias pointing elsewhere."""

    def __init__(self, model: str, alias: str, expected: int | None, actual: int | None) -> None:
        super().__init__(
            f"alias {model}:{alias} points at {_version_text(actual)}, "
            f"not the expected {_version_text(expected)}; nothing was changed"
        )
        self.model, self.alias, self.expected, self.actual = model, alias, expected, actual


class VersionInUseError(ConflictError):
    """A version still has aliases pointing at it."""

    def __init__(self, model: str, version: int, aliases: Sequence[str]) -> None:
        names = ", ".join(aliases)
        super().__init__(
            f"{model}:{version} is still pointed at by alias(es) {names}; "
            "move them first or pass --force"
        )
        self.model, self.version, self.aliases = model, version, list(aliases)


class ClassInUseError(ConflictError):
    """A class cannot be deleted while stored versions use it."""

    def __init__(self, name: str, versions: Sequence[str]) -> None:
        super().__init__(
            f"module class {name!r} is used by version(s) {listing(versions)}; delete them first"
        )
        self.name, self.versions = name, list(versions)


class ClassMismatchError(ConflictError):
    """A push names a different class than the model was created with."""

    def __init__(self, model: str, existing: str, given: str) -> None:
        super().__init__(f"model {model!r} uses class {existing!r}, not {given!r}")


class ClassNotAllowedError(RegistryError):
    """An import path outside the configured allowed prefixes."""

    def __init__(self, import_path: str, allowed: Sequence[str]) -> None:
        package = import_path.partition(":")[0].split(".")[0]
        super().__init__(
            f"import path {import_path!r} is not under an allowed prefix "
            f"({', '.join(allowed) or 'none configured'}): allow it with --allow-prefix "
            f"{package} (MODULESERVE_ALLOWED_CLASS_PREFIXES, or allowed_class_prefixes in "
            "moduleserve.toml)"
        )


class ClassBuildError(InvalidInputError):
    """The class could not be imported or constructed with its kwargs."""


class ForwardCheckError(InvalidInputError):
    """A class's forward pass on its own spec (rows of zeros, with the weights when there
    are some) fails, or returns outputs that cannot be served: nothing was stored."""


class UnsafeCheckpointError(InvalidInputError):
    """A pickle tried to do more than hold tensors; it was refused and nothing ran."""


class CheckpointFormatError(InvalidInputError):
    """A file is not a readable checkpoint or dataset."""


class StateDictMismatchError(RegistryError):
    """A state_dict does not load strictly into its Module class."""

    def __init__(
        self,
        class_name: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, list[int], list[int]]],
        wrong_dtypes: Sequence[tuple[str, str, str]] = (),
        source: str = "state_dict",
    ) -> None:
        parts = []
        if missing:
            parts.append(f"missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {listing(unexpected)}")
        for key, expected, got in mismatched[:LISTED]:
            parts.append(f"shape mismatch for {shorten(key)}: expected {expected}, got {got}")
        if len(mismatched) > LISTED:
            parts.append(f"and {len(mismatched) - LISTED} more shape mismatches")
        for key, want, have in wrong_dtypes[:LISTED]:
            parts.append(f"dtype mismatch for {shorten(key)}: expected {want}, got {have}")
        if len(wrong_dtypes) > LISTED:
            parts.append(f"and {len(wrong_dtypes) - LISTED} more dtype mismatches")
        super().__init__(f"{source} does not fit class {class_name!r}: " + "; ".join(parts))
        self.missing, self.unexpected, self.mismatched = (
            list(missing),
            list(unexpected),
            list(mismatched),
        )
        self.wrong_dtypes = list(wrong_dtypes)


class IntegrityError(RegistryError):
    """A blob is missing or its bytes no longer match its digest."""

    def __init__(self, digest: str, problem: str) -> None:
        super().__init__(f"blob sha256:{digest[:12]}… is {problem}")
        self.digest, self.problem = digest, problem


class RegistryUnavailableError(RegistryError):
    """The database could not be reached or stayed locked past the busy timeout."""


class SchemaOutdatedError(RegistryError):
    """The database schema is behind this release."""


class RegistryMissingError(SchemaOutdatedError):
    """The registry's SQLite file does not exist (it was never initialised there)."""


def _version_text(version: int | None) -> str:
    return "nothing" if version is None else f"version {version}"


class JobNotFoundError(NotFoundError):
    """No job with that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class JobStateError(ConflictError):
    """The job's state does not allow the operation (e.g. cancelling a finished job)."""


# A hostile file can hold 100k keys or a 1 MB key: messages quote a few, shortened.
LISTED = 10


def shorten(text: object, limit: int = 80) -> str:
    """`text` on one line, at most `limit` characters (control characters become '?')."""
    whole = str(text)
    flat = "".join(c if c.isprintable() else "?" for c in whole[:limit])
    return flat if len(whole) <= limit else flat[: limit - 1] + "…"


def listing(items: Sequence[object], limit: int = LISTED) -> str:
    """Up to `limit` items, comma-separated and shortened, then "and N more"."""
    shown = ", ".join(shorten(item) for item in items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
