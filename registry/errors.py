"""Registry errors: plain classes carrying the facts, never transport status codes."""

from __future__ import annotations

from collections.abc import Sequence


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class InvalidInputError(RegistryError):
    """A caller passed something malformed (a name, a file, an argument)."""


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


class ClassMismatchError(ConflictError):
    """A push names a different class than the model was created with."""

    def __init__(self, model: str, existing: str, given: str) -> None:
        super().__init__(f"model {model!r} uses class {existing!r}, not {given!r}")


class ClassNotAllowedError(RegistryError):
    """An import path outside the configured allowed prefixes."""

    def __init__(self, import_path: str, allowed: Sequence[str]) -> None:
        super().__init__(
            f"import path {import_path!r} is not under an allowed prefix "
            f"({', '.join(allowed) or 'none configured'})"
        )


class ClassBuildError(InvalidInputError):
    """The class could not be imported or constructed with its kwargs."""


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
    ) -> None:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        for key, expected, got in mismatched:
            parts.append(f"shape mismatch for {key}: expected {expected}, got {got}")
        super().__init__(f"state_dict does not fit class {class_name!r}: " + "; ".join(parts))
        self.missing, self.unexpected, self.mismatched = (
            list(missing),
            list(unexpected),
            list(mismatched),
        )


class IntegrityError(RegistryError):
    """A blob is missing or its bytes no longer match its digest."""

    def __init__(self, digest: str, problem: str) -> None:
        super().__init__(f"blob sha256:{digest[:12]}… is {problem}")
        self.digest, self.problem = digest, problem


class RegistryUnavailableError(RegistryError):
    """The database could not be reached or stayed locked past the busy timeout."""


class SchemaOutdatedError(RegistryError):
    """The database schema is behind this release."""


def _version_text(version: int | None) -> str:
    return "nothing" if version is None else f"version {version}"


class JobNotFoundError(NotFoundError):
    """No job with that id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class JobStateError(ConflictError):
    """The job's state does not allow the operation (e.g. cancelling a finished job)."""
