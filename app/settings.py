"""One settings class for the whole service (environment variables with the ``DISTILLERY_`` prefix)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration. Defaults give the embedded mode: SQLite, a SQLite-backed queue, local files."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("./var"), description="Root of local state: database, queue, blobs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/distillery.db")
    broker_url: str | None = Field(None, description="Celery broker; default a SQLite queue under data_dir")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Larger uploads get 413.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_threads: int | None = Field(None, ge=1, description="torch intra-op threads in the worker.")
    job_queue: str = Field("cpu", description="Queue new jobs are sent to ('cpu' or 'gpu').")
    worker_queues: str | None = Field(None, description="Queues a worker consumes; default from its device.")
    max_attempts: int = Field(3, ge=1)
    lease_seconds: int = Field(120, ge=5, description="A running job whose lease expires is requeued.")
    checkpoint_seconds: float = Field(60.0, ge=0, description="A training checkpoint at most this often "
                                                                "(0: every epoch); a retried job resumes from it.")
    inspect_timeout_seconds: float = Field(60.0, gt=0)
    allowed_file_roots: list[Path] = Field(default_factory=list)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'distillery.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'queue.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


@lru_cache
def get_settings() -> Settings:
    s = Settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return s
