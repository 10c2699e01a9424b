"""One settings object, from ``TRAINQ_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINQ_", extra="ignore")

    #: Where embedded mode keeps its SQLite file and artifacts.
    home: Path = Path(".trainq")
    #: SQLAlchemy URL; SQLite under ``home`` when unset.
    database_url: str | None = None
    #: Checkpoints, models and datasets, addressed by content hash; under ``home`` when unset.
    artifact_dir: Path | None = None
    #: Join an existing Ray cluster instead of starting a local one.
    ray_address: str | None = Field(default=None, validation_alias="RAY_ADDRESS")

    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    max_body_bytes: int = 1_000_000
    max_upload_bytes: int = 200_000_000
    max_total_params: int = 50_000_000
    max_cluster_workers: int | None = None

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'trainq.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or (self.home / "artifacts")


@lru_cache
def get_settings() -> Settings:
    return Settings()
