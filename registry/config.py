"""Registry settings: where the database and the blob store live, which classes may load."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("data")


class RegistrySettings(BaseSettings):
    """Settings shared by every process that opens the registry."""

    model_config = SettingsConfigDict(env_prefix="MODULESERVE_", extra="ignore")

    db: str = ""
    """SQLAlchemy URL; empty means a SQLite file `registry.db` beside the store."""

    store: Path = DEFAULT_DATA_DIR / "store"
    """Folder of the content-addressed blob store."""

    allowed_class_prefixes: list[str] = Field(default_factory=lambda: ["registry.demo"])
    """Python packages whose classes may be registered (`pkg` allows `pkg` and `pkg.*`)."""

    default_alias: str = "production"
    """The alias an empty version in a request resolves to; the latest version when unset."""

    max_upload_mb: float = Field(default=4096, gt=0)
    """Largest dataset accepted by a streamed upload."""

    busy_timeout_ms: int = Field(default=30_000, ge=0)
    """How long a SQLite writer waits for the lock before the registry reports unavailable."""

    def database_url(self) -> str:
        """The configured URL, or the default SQLite file next to the store."""
        if self.db:
            return self.db
        return f"sqlite:///{self.store.parent.resolve() / 'registry.db'}"
