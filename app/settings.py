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
    worker_threads: int | None = Field(None, ge=1, description="torch intra-op threads of a job; default: one for small "
                                    "models (teacher weights × batch < 2**24), else every core.")
    job_queue: str = Field("cpu", description="Queue new jobs are sent to ('cpu' or 'gpu').")
    worker_queues: str | None = Field(None, description="Queues a worker consumes; default from its device.")
    max_attempts: int = Field(3, ge=1)
    lease_seconds: int = Field(120, ge=5, description="A running job whose lease expires is requeued.")
    checkpoint_seconds: float = Field(60.0, ge=0, description="A training checkpoint at most this often "
                                                                "(0: every epoch); a retried job resumes from it.")
    # ---- reliability (docs/operations.md) --------------------------------------------------------
    db_retry_seconds: float = Field(120.0, ge=0, description="How long a worker retries database writes through an "
                                                             "outage before giving the attempt up to the reaper.")
    db_idle_transaction_seconds: float = Field(10.0, ge=0, description="Workers: PostgreSQL ends a worker's "
                                               "session that sits this long inside a transaction (a worker frozen "
                                               "or swapped out mid-write), releasing its row locks; 0: never.")
    shutdown_grace_seconds: float = Field(30.0, gt=0, description="SIGTERM: a worker checkpoints and releases its "
                                                                  "job, the API drains requests, within this long.")
    dispatch_interval_seconds: float = Field(0.5, gt=0, description="How often the dispatcher publishes new "
                                                                    "dispatches (the outbox).")
    resend_after_seconds: float = Field(5.0, gt=0, description="A queued job whose message the broker lost is "
                                                               "re-sent once its last send is this old.")
    inspect_timeout_seconds: float = Field(60.0, gt=0)
    allowed_file_roots: list[Path] = Field(default_factory=list)

    # ---- blob storage (app/storage/, docs/integration.md) ----------------------------------------------
    storage_url: str | None = Field(None, description="Where blobs (models, datasets, artifacts, checkpoints) "
                                    "live: file:///absolute/dir or s3://bucket/prefix; default "
                                    "file://<data_dir>/blobs. S3 credentials come from boto3's standard chain "
                                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, roles).")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint for an S3-compatible store (MinIO: "
                                        "http://minio:9000); unset: AWS S3 in AWS_DEFAULT_REGION.")
    s3_public_endpoint_url: str | None = Field(None, description="Endpoint that presigned download URLs name, "
                                               "when clients reach the store by another address than the "
                                               "service does; default DISTILLERY_S3_ENDPOINT_URL.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket in the path (path: MinIO and most self-hosted stores) or in the host name.")
    s3_multipart_threshold_bytes: int = Field(64 * 1024**2, gt=0, description="Blobs at least this large are "
                                              "uploaded in parts (and downloaded as parallel ranged GETs).")
    s3_multipart_chunk_bytes: int = Field(64 * 1024**2, ge=5 * 1024**2, description="Size of one part of a "
                                          "multipart upload (S3's minimum is 5 MiB).")
    s3_max_concurrency: int = Field(8, ge=1, description="Parts one upload or download transfers at once.")
    s3_presigned_downloads: bool = Field(False, description="GET /v1/artifacts/{id}/content answers 307 to a "
                                         "short-lived presigned URL of the object store (after the API key and "
                                         "tenant are checked) instead of streaming through the API.")
    s3_presigned_seconds: int = Field(300, ge=1, le=7 * 24 * 3600, description="How long a presigned download "
                                      "URL stays valid.")
    blob_cache_dir: Path | None = Field(None, description="Worker: where inputs downloaded from a remote store "
                                        "are kept, by sha256, for the next job (default <data_dir>/cache/blobs; "
                                        "unused with file:// storage, whose blobs are read in place).")
    blob_cache_bytes: int = Field(50 * 1024**3, gt=0, description="Worker: the input cache is trimmed to this "
                                  "many bytes, least recently used first (inputs of running jobs stay).")

    # ---- dataset URIs (POST /v1/datasets {"uri": …}; docs/integration.md) -------------------------------
    allowed_s3_buckets: list[str] = Field(default_factory=list, description="JSON list of buckets s3:// dataset "
                                          "URIs may read from (with the storage's endpoint and credentials); "
                                          "empty: s3:// URIs are off.")
    allowed_http_hosts: list[str] = Field(default_factory=list, description="JSON list of hosts (host or "
                                          "host:port) https:// dataset URIs may fetch from, redirects included; "
                                          "empty: https:// URIs are off.")
    dataset_allow_http: bool = Field(False, description="Also accept plain http:// dataset URIs (and redirects) "
                                     "to the allowed hosts: for closed networks and tests only.")
    dataset_fetch_timeout_seconds: float = Field(300.0, gt=0, description="Longest a dataset URI may take to "
                                                 "download, connecting and every redirect included.")

    # ---- served teachers (docs/llm.md#a-served-teacher) ----------------------------------------------
    teacher_endpoint_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts (host or host:port, comma-separated or a JSON list) a job's "
                                          "teacher.endpoint may name; empty: served teachers are off.")
    teacher_endpoint_api_key: str | None = Field(None, description="Bearer token the worker sends to served "
                                                 "teachers (never stored in a spec, never seen by the executor).")
    teacher_endpoint_timeout_seconds: float = Field(120.0, gt=0, description="Each request to a served teacher.")

    # ---- the sandboxed executor (docs/security.md) ------------------------------------------
    sandbox: Literal["auto", "bwrap", "process"] = Field(
        "auto", description="How untrusted work (upload inspection, job runs) is isolated: bwrap (bubblewrap "
                            "namespaces, refuse to start without it), process (a scrubbed child with rlimits only) "
                            "or auto (bwrap when installed, else process with a warning).")
    inspect_memory_bytes: int = Field(4 * 1024**3, gt=0, description="Memory limit of one upload inspection.")
    executor_prestart: bool = Field(True, description="A worker keeps its next job's sandboxed executor started, "
                                    "with torch and the engine imported (worker/prestart.py).")
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
    metrics_dir: Path | None = Field(None, description="Where the API processes keep their Prometheus samples "
                                                       "(prometheus_client multiprocess mode), so /metrics sums "
                                                       "every process; default <data_dir>/metrics. Emptied by "
                                                       "'distillery serve' at start.")

    # ---- experiment tracking (worker/tracking/, docs/integration.md#mlflow) --------------------------
    mlflow_tracking_uri: str | None = Field(None, description="An MLflow tracking server (http:// or https://); "
                                                              "unset: jobs asking for 'tracking' get 422.")
    mlflow_timeout_seconds: int = Field(10, ge=1, le=600, description="Longest one call to the tracking server "
                                                                      "may take (MLFLOW_HTTP_REQUEST_TIMEOUT).")
    mlflow_max_retries: int = Field(1, ge=0, le=10, description="Retries of a failed tracking call "
                                                                "(MLFLOW_HTTP_REQUEST_MAX_RETRIES); a tracker "
                                                                "that stays away is given up, never the job.")
    mlflow_finish_seconds: float = Field(300.0, gt=0, description="After a job ended, its worker waits this long "
                                                                  "for the run to be completed on the tracking "
                                                                  "server (files, registration), then gives the "
                                                                  "tracking up and takes the next job.")

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

    @field_validator("webhook_allowed_hosts", "webhook_retry_schedule", "teacher_endpoint_hosts", mode="before")
    @classmethod
    def _list_from_env(cls, v: Any) -> Any:
        """A JSON list, or the friendlier ``a,b,c``."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("webhook_allowed_hosts", "teacher_endpoint_hosts")
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

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_server(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if not v.startswith(("http://", "https://")):
            # A file or database store would have every worker write its own copy: one server for all.
            raise ValueError("DISTILLERY_MLFLOW_TRACKING_URI must be an http:// or https:// tracking server")
        return v.rstrip("/")

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if v.startswith("s3://"):
            from app.storage.s3 import parse_s3_url

            parse_s3_url(v)
        else:
            from app.storage import file_url_path

            file_url_path(v)
        return v

    @field_validator("allowed_s3_buckets", "allowed_http_hosts")
    @classmethod
    def _lowercase(cls, v: list[str]) -> list[str]:
        return [item.strip().lower() for item in v if item.strip()]

    def teacher_endpoint_allowed(self, url: str) -> bool:
        """Whether a served teacher at ``url`` is on the allow-list: its host, or host:port, is listed."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            return False
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return host in self.teacher_endpoint_hosts or f"{host}:{port}" in self.teacher_endpoint_hosts

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'distillery.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'queue.db'}"

    @property
    def blob_dir(self) -> Path:
        """The default local storage root (used when DISTILLERY_STORAGE_URL is unset)."""
        return self.data_dir / "blobs"

    @property
    def resolved_metrics_dir(self) -> Path:
        return (self.metrics_dir or self.data_dir / "metrics").expanduser().resolve()

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or self.blob_dir.as_uri()

    @property
    def resolved_blob_cache_dir(self) -> Path:
        return self.blob_cache_dir or self.data_dir / "cache" / "blobs"


@lru_cache
def get_settings() -> Settings:
    s = Settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return s
