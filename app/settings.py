"""One settings class for the whole service (environment variables with the ``DISTILLERY_`` prefix)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Seconds between a webhook delivery's attempts (Standard Webhooks' / Svix's schedule): 5 s, 5 min, 30 min,
#: 2 h, 5 h, 10 h — the first attempt at once, so 7 attempts over about 17.6 hours.
DEFAULT_WEBHOOK_RETRY_SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0]


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
    # ---- reliability (docs/operations.md) --------------------------------------------------------
    db_retry_seconds: float = Field(120.0, ge=0, description="How long a worker retries database writes through an "
                                                             "outage before giving the attempt up to the reaper.")
    shutdown_grace_seconds: float = Field(30.0, gt=0, description="SIGTERM: a worker checkpoints and releases its "
                                                                  "job, the API drains requests, within this long.")
    dispatch_interval_seconds: float = Field(0.5, gt=0, description="How often the dispatcher publishes new "
                                                                    "dispatches (the outbox).")
    resend_after_seconds: float = Field(5.0, gt=0, description="A queued job whose message the broker lost is "
                                                               "re-sent once its last send is this old.")
    inspect_timeout_seconds: float = Field(60.0, gt=0)
    allowed_file_roots: list[Path] = Field(default_factory=list)

    # ---- the sandboxed executor (docs/security.md) ------------------------------------------
    sandbox: Literal["auto", "bwrap", "process"] = Field(
        "auto", description="How untrusted work (upload inspection, job runs) is isolated: bwrap (bubblewrap "
                            "namespaces, refuse to start without it), process (a scrubbed child with rlimits only) "
                            "or auto (bwrap when installed, else process with a warning).")
    inspect_memory_bytes: int = Field(4 * 1024**3, gt=0, description="Memory limit of one upload inspection.")
    executor_max_open_files: int = Field(1024, ge=64, description="RLIMIT_NOFILE of an executor.")
    executor_max_file_bytes: int = Field(16 * 1024**3, gt=0, description="RLIMIT_FSIZE: largest file an executor "
                                                                          "may write.")
    executor_scratch_bytes: int = Field(32 * 1024**3, gt=0, description="Most bytes a job's scratch directory "
                                                                        "may hold.")
    executor_message_bytes: int = Field(1024 * 1024, ge=4096, description="Longest line the supervisor accepts "
                                                                          "from an executor.")

    # ---- job budgets, checked before 202 (app/jobs/budget.py) and enforced by the executor ------
    max_job_parameters: int = Field(1_000_000_000, gt=0, description="Most parameters a job's teacher or "
                                                                      "student may have.")
    max_job_memory_bytes: int = Field(16 * 1024**3, gt=0, description="Most resident memory a job may need "
                                                                       "(estimate before 202; executor limit).")
    max_job_seconds: int = Field(6 * 3600, gt=0, description="Most wall time a job may take (estimate before "
                                                             "202; executor limit per attempt).")
    budget_flops_per_second: float = Field(2e10, gt=0, description="Sustained FLOP/s assumed when turning a "
                                                                   "job's compute into seconds.")

    # ---- request hardening ---------------------------------------------------------------------
    max_json_body_bytes: int = Field(1024 * 1024, gt=0, description="Larger JSON bodies get 413.")
    max_json_depth: int = Field(32, ge=4, description="Deeper JSON bodies get 422.")
    max_archive_bytes: int = Field(8 * 1024**3, gt=0, description="Most bytes an uploaded archive (npz, zip, "
                                                                  "TorchScript, .pt2) may inflate to.")
    max_archive_ratio: float = Field(100.0, gt=1, description="Highest compression ratio accepted for an "
                                                              "archive that inflates past 64 MiB.")
    max_archive_members: int = Field(200_000, gt=0, description="Most members an uploaded archive may hold.")
    metrics_token: str | None = Field(None, description="When set, GET /metrics requires "
                                                        "'Authorization: Bearer <token>'.")

    # ---- the API under load and outages (app/db/session.py, app/auth.py; SIGTERM: shutdown_grace_seconds) ----
    api_workers: int = Field(1, ge=1, description="'distillery serve' runs this many API processes (uvicorn "
                                                  "workers); each has its own pool and key cache.")
    db_pool_size: int = Field(20, ge=1, description="Requests of one API process that may hold a database session "
                                                    "at once; the pool keeps as many connections.")
    db_pool_overflow: int = Field(10, ge=0, description="Extra pooled connections for work outside requests "
                                                        "(event streams, sweeps, readiness checks).")
    db_pool_timeout_seconds: float = Field(5.0, gt=0, description="Longest a request waits for a database "
                                                                  "connection before it answers 503.")
    db_connect_timeout_seconds: int = Field(3, ge=1, description="Opening a PostgreSQL connection gives up after "
                                                                 "this long.")
    ready_timeout_seconds: float = Field(2.0, gt=0, description="GET /readyz answers 503 when the database or "
                                                                "the broker has not answered within this long.")
    auth_cache_seconds: float = Field(5.0, ge=0, description="A verified API key is trusted this long without a "
                                                             "query (0: never cached); a key revoked by another "
                                                             "process stops working within this long.")
    auth_cache_size: int = Field(10_000, ge=1, description="Most API keys one API process remembers.")
    job_cache_size: int = Field(10_000, ge=0, description="Most rendered GET /v1/jobs/{id} bodies one API process "
                                                          "keeps until PostgreSQL notifies a change of the row "
                                                          "(app/api/job_cache.py); 0: off. Off on SQLite.")

    # ---- sweeps: what a killed process left in the data dir (app/sweep.py, docs/operations.md) --------
    sweep_temp_age_seconds: float = Field(600.0, gt=0, description="Temp uploads, .partial blobs and work dirs "
                                          "of ended jobs unwritten this long are removed (upload temp files are "
                                          "kept at least DISTILLERY_INSPECT_TIMEOUT_SECONDS + 60 s).")
    sweep_orphan_age_seconds: float = Field(3600.0, gt=0, description="Blobs no row references, and checkpoints "
                                            "of ended jobs, are removed once this old (blobs are written before "
                                            "their rows).")
    sweep_interval_seconds: float = Field(300.0, ge=0, description="The API sweeps at start and then this often "
                                          "(0: never; run 'distillery sweep' instead).")

    # ---- webhooks (docs/integration.md#webhooks, app/webhooks/) -------------------------------------
    webhook_allow_http: bool = Field(False, description="Accept http:// webhook URLs (only https:// otherwise).")
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts (names or IP literals, comma-separated or a JSON list) a webhook "
                                          "may reach although they resolve to loopback, private, link-local or "
                                          "other non-public addresses.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120, description="Each network step of a delivery "
                                           "attempt (connect, send, each read) gives up after this long.")
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_RETRY_SCHEDULE),
        description="Seconds before each retry of a failed delivery (comma-separated or a JSON list); a "
                    "delivery is failed after 1 + len(schedule) attempts.")
    webhook_disable_after_failures: int = Field(5, ge=0, description="An endpoint is disabled after this many "
                                                "deliveries in a row failed every attempt (0: never).")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="Deliveries the leading worker sends at once "
                                     "(one at a time per endpoint).")

    @field_validator("webhook_allowed_hosts", "webhook_retry_schedule", mode="before")
    @classmethod
    def _list_from_env(cls, v: Any) -> Any:
        """A JSON list, or the friendlier ``a,b,c``."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _hosts_lowercase(cls, v: list[str]) -> list[str]:
        return [h.strip().lower().strip("[]").rstrip(".") for h in v if h.strip()]

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, v: list[float]) -> list[float]:
        if any(d < 0 for d in v) or len(v) > 20:
            raise ValueError("retry delays are seconds >= 0, at most 20 of them")
        return v

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
