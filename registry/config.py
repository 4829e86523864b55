"""Registry settings: where the database and the blob store live, which classes may load.

Settings come from, strongest first: flags (the CLIs pass them as arguments), MODULESERVE_*
environment variables, a `moduleserve.toml` (the nearest one in the current folder or
above it, or the file MODULESERVE_CONFIG names), then the defaults. Relative paths in
`moduleserve.toml` are relative to that file, so every command run anywhere inside a
project uses the same registry.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_DATA_DIR = Path("data")
DEMO_PREFIX = "moduleserve.registry.demo"
CONFIG_FILE = "moduleserve.toml"
CONFIG_ENV = "MODULESERVE_CONFIG"


class RegistrySettings(BaseSettings):
    """Settings shared by every process that opens the registry."""

    model_config = SettingsConfigDict(env_prefix="MODULESERVE_", extra="ignore")

    db: str = ""
    """SQLAlchemy URL; empty means a SQLite file `registry.db` beside the store."""

    store: Path = DEFAULT_DATA_DIR / "store"
    """Folder of the content-addressed blob store."""

    allowed_class_prefixes: list[str] = Field(default_factory=list)
    """Python packages whose classes may be registered (`pkg` allows `pkg` and `pkg.*`),
    besides the demo's `moduleserve.registry.demo`, which is always allowed."""

    class_path: list[Path] = Field(default_factory=list)
    """Folders to import Module classes' packages from (put on sys.path), for a package
    that is not installed."""

    default_alias: str = "production"
    """The alias an empty version in a request resolves to; the latest version when unset."""

    max_upload_mb: float = Field(default=4096, gt=0)
    """Largest dataset accepted by a streamed upload."""

    busy_timeout_ms: int = Field(default=30_000, ge=0)
    """How long a SQLite writer waits for the lock before the registry reports unavailable."""

    config_file: Path | None = None
    """The moduleserve.toml these settings were read from (set by the loader)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then moduleserve.toml."""
        return init_settings, env_settings, ProjectFileSource(settings_cls)

    def database_url(self) -> str:
        """The configured URL, or the default SQLite file next to the store."""
        if self.db:
            return self.db
        return f"sqlite:///{self.store.parent.resolve() / 'registry.db'}"

    def allowed_prefixes(self) -> list[str]:
        """The demo's package and the configured ones, each once."""
        return list(dict.fromkeys([DEMO_PREFIX, *self.allowed_class_prefixes]))


SettingsT = TypeVar("SettingsT", bound=RegistrySettings)


def with_added(
    settings: SettingsT, prefixes: Sequence[str] = (), class_path: Sequence[Path] = ()
) -> SettingsT:
    """`settings` with the command line's --allow-prefix and --class-path added to what the
    environment or moduleserve.toml gave (flags extend those lists rather than replace them)."""
    if not prefixes and not class_path:
        return settings
    return settings.model_copy(
        update={
            "allowed_class_prefixes": [*settings.allowed_class_prefixes, *prefixes],
            "class_path": [*settings.class_path, *class_path],
        }
    )


class ProjectFileSource(PydanticBaseSettingsSource):
    """Settings from the nearest moduleserve.toml (keys are the settings' field names)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self.path = find_config_file()
        self.values = _read(self.path) if self.path is not None else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """One field's value from the file (pydantic-settings' source protocol)."""
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        fields = self.settings_cls.model_fields
        for key in self.values:
            # Keys of other commands' settings (a server option read by the registry CLI)
            # are fine; one a letter away from ours is a typo that would be ignored.
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.85)
            if key not in fields and close:
                raise ValueError(
                    f"{self.path}: unknown setting {key!r}; did you mean {close[0]!r}?"
                )
        values = {k: v for k, v in self.values.items() if k in fields}
        return {**values, "config_file": self.path}


def _check_trusted(path: Path) -> None:
    """Refuse a settings file another user could have written: it chooses which code loads."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(
            f"refusing {path}: another user owns it or may write it, and it decides which "
            "code moduleserve imports; fix its owner and mode, or set MODULESERVE_CONFIG"
        )


def find_config_file(start: Path | None = None) -> Path | None:
    """MODULESERVE_CONFIG if set, else the nearest moduleserve.toml from `start` upward."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named).resolve()
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / CONFIG_FILE
        if path.is_file():
            return path
    return None


def _read(path: Path) -> dict[str, Any]:
    """The file's settings, with relative paths made relative to the file's folder."""
    _check_trusted(path)
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    base = path.parent
    if "store" in values:
        values["store"] = str(base / str(values["store"]))
    if "class_path" in values:
        folders = values["class_path"]
        folders = [folders] if isinstance(folders, str) else folders
        values["class_path"] = [str(base / str(p)) for p in folders]
    db = str(values.get("db", ""))
    if db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
        values["db"] = f"sqlite:///{base / db.removeprefix('sqlite:///')}"
    return values
