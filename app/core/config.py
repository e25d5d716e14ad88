"""Settings: one pydantic-settings class, prefix TUNEFORGE_, read once.

With no database or broker URL set, Tuneforge runs on one machine with nothing
installed: SQLite in the data dir and kombu's filesystem transport as the broker
(it works across processes on one host). Production sets both URLs.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class QuotaDefaults(BaseModel):
    """Per-team limits; a team's row in team_quota overrides each one (`tuneforge admin set-quota`)."""

    model_config = ConfigDict(frozen=True)

    running_jobs: int = Field(default=1, ge=0, description=(
        "Jobs of one team training at once. Keep it below the training slots (the training workers' "
        "--concurrency, summed; 2 by default), so that one team cannot hold every slot."))
    queued_jobs: int = Field(default=100, ge=0, description="Jobs of one team waiting to start.")
    storage_bytes: int = Field(default=50 * 1024**3, ge=0, description="Total size of a team's files.")
    files: int = Field(default=10_000, ge=0, description="Number of a team's files.")
    trained_tokens: int = Field(default=50_000_000, ge=0, description=(
        "Tokens one job may train on, epochs included; refused at create time by an estimate, stopped and "
        "failed while running when passed."))
    job_wall_seconds: int = Field(default=6 * 3600, ge=0, description=(
        "Wall time one run of a job may train; the job fails once it is passed."))
    evaluation_wall_seconds: int = Field(default=2 * 3600, ge=0, description=(
        "Wall time one evaluation may run; it fails once it is passed."))


class RequestLimits(BaseModel):
    """Bounds on what one request may ask for, the same for every team."""

    model_config = ConfigDict(frozen=True)

    lora_r: int = Field(default=64, ge=1, description="Largest LoRA rank a job may ask for.")
    evaluation_samples: int = Field(default=2000, ge=1, description=(
        "Most completions one evaluation may sample and run: n x tasks (after `limit`)."))


class RateLimitSettings(BaseModel):
    """Token bucket per API key: `burst` requests at once, refilled at `per_second`. Shared across
    API processes through Redis when the broker is Redis, per process otherwise."""

    model_config = ConfigDict(frozen=True)

    # Below what the API serves (a few hundred requests/s on two cores): one key cannot use it all.
    per_second: float = Field(default=50.0, gt=0)
    burst: int = Field(default=100, ge=1)
    failed_auth_per_second: float = Field(default=1.0, gt=0, description=(
        "Failed authentications per second per client address, after the burst; past it 429."))
    failed_auth_burst: int = Field(default=20, ge=1)


class ConcurrencySettings(BaseModel):
    """Requests in flight at once, per key and per team (app/api/concurrency.py): past either, 429 at
    once with Retry-After, so one team's flood never queues another team behind the pool. Per API
    process."""

    model_config = ConfigDict(frozen=True)

    per_key: int = Field(default=8, ge=1, description="Requests of one key in flight at once.")
    per_team: int = Field(default=16, ge=1, description="Requests of one team (all its keys) in flight at once.")


class DatabaseSettings(BaseModel):
    """The connection pool of each process, and the API's worker threads, sized to each other: every
    sync route and every database call of the API runs on one of `api_threads` threads, and a
    request's session keeps its connection from its first query until its commit, which may wait
    for a thread; so the pool has room for every thread plus requests between route and commit,
    and a request never waits for a connection behind a flood."""

    model_config = ConfigDict(frozen=True)

    pool_size: int = Field(default=10, ge=1, description="Connections kept open.")
    max_overflow: int = Field(default=30, ge=0, description="Connections opened beyond pool_size under load.")
    pool_timeout_seconds: float = Field(default=10.0, gt=0, description=(
        "Longest wait for a connection before the request answers 503."))
    api_threads: int = Field(default=24, ge=1, description=(
        "Worker threads of the API process (sync routes, database calls). Keep it below pool_size + "
        "max_overflow: past the pool, threads wait for connections and time out with 503."))


class CacheSettings(BaseModel):
    """Each worker's and inference process's staged copies of blobs (data_dir/cache)."""

    model_config = ConfigDict(frozen=True)

    max_bytes: int = Field(default=100 * 1024**3, ge=0, description=(
        "Past this size, staging a new blob removes the least recently used ones; 0: no limit."))
    min_idle_seconds: float = Field(default=3600.0, ge=0, description=(
        "A blob used more recently than this is never removed, however large the cache."))


class UploadSettings(BaseModel):
    """Multipart uploads (/v1/uploads): files past the single-request limit, sent in parts."""

    model_config = ConfigDict(frozen=True)

    max_bytes: int = Field(default=8 * 1024**3, gt=0, description=(
        "Largest file one upload may assemble, in bytes (OpenAI's limit: 8 GB)."))
    part_max_bytes: int = Field(default=64 * 1024**2, gt=0, description=(
        "Largest part, in bytes (OpenAI's limit: 64 MB)."))
    expire_seconds: int = Field(default=3600, gt=0, description=(
        "A pending upload expires this long after it was created; the reaper then deletes its parts."))


class MetricsSettings(BaseModel):
    """Prometheus metrics (README, "Metrics and logs"). The API serves GET /metrics itself; a Celery
    worker serves its own on worker_port from its main process, its pool children's samples included
    (prometheus_client's multiprocess mode); an inference process serves /metrics on its own port."""

    model_config = ConfigDict(frozen=True)

    token: SecretStr | None = Field(default=None, description=(
        "When set, the API's GET /metrics answers 401 unless sent `Authorization: Bearer <token>`."))
    worker_port: int = Field(default=0, ge=0, le=65535, description=(
        "Port of a Celery worker's /metrics server; 0: none."))
    worker_host: str = Field(default="127.0.0.1", description=(
        "Address the worker's /metrics server listens on (0.0.0.0 in docker-compose)."))


class S3Settings(BaseModel):
    """Where the S3-compatible store is and how to sign for it, when TUNEFORGE_STORAGE_URL is s3://...
    Unset fields fall back to boto3's own configuration (AWS_ACCESS_KEY_ID, AWS_REGION,
    AWS_ENDPOINT_URL, ~/.aws/config, an instance role)."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = Field(default=None, description=(
        "The S3 API's URL, e.g. http://minio:9000; unset: AWS S3 (or boto3's AWS_ENDPOINT_URL)."))
    public_endpoint_url: str | None = Field(default=None, description=(
        "The URL clients reach the store at, for presigned download URLs; unset: endpoint_url."))
    region: str | None = Field(default=None, description="Region to sign for; unset: boto3's default.")
    access_key_id: str | None = Field(default=None)
    secret_access_key: SecretStr | None = Field(default=None)
    addressing_style: Literal["auto", "path", "virtual"] = Field(default="auto", description=(
        "path for MinIO and most self-hosted stores whose bucket names are not DNS names."))


class StorageSettings(BaseModel):
    """How blobs move (either backend); TUNEFORGE_STORAGE_URL picks the backend."""

    model_config = ConfigDict(frozen=True)

    presigned_downloads: bool = Field(default=False, description=(
        "With S3 storage, file and adapter downloads answer 302 to a presigned URL of the object instead "
        "of streaming it through the API. The local backend always streams."))
    presign_seconds: int = Field(default=300, ge=1, le=7 * 24 * 3600, description=(
        "How long a presigned download URL stays valid."))
    part_bytes: int = Field(default=16 * 1024**2, ge=5 * 1024**2, le=5 * 1024**3, description=(
        "Part size of multipart transfers to and from S3 (S3's minimum part is 5 MiB)."))
    transfer_threads: int = Field(default=4, ge=1, le=32, description=(
        "Parts in flight at once per transfer; memory per transfer is about part_bytes x this."))


class WebhookSettings(BaseModel):
    """Signed webhooks (app/domains/webhooks): where deliveries are sent from, how they are retried,
    and which addresses an endpoint may reach. A URL that resolves to a private, loopback,
    link-local, multicast or reserved address is refused at create and again at every delivery,
    unless allowed here."""

    model_config = ConfigDict(frozen=True)

    queue: str = Field(default="webhooks", min_length=1, description=(
        "Celery queue of the delivery task; kept apart from training and evaluation, whose tasks run for hours."))
    max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts of one delivery before it is failed.")
    retry_base_seconds: float = Field(default=30.0, gt=0, description=(
        "Wait after the first failed attempt; each further one waits twice as long."))
    timeout_seconds: float = Field(default=10.0, gt=0, description="Longest wait for one attempt's answer.")
    allow_private: bool = Field(default=False, description=(
        "Let endpoints reach private, loopback and link-local addresses (a receiver on the operator's own network)."))
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = Field(default=(), description=(
        "Networks an endpoint may reach although they are private, as a JSON list: '[\"10.1.0.0/16\"]'."))
    secret_grace_seconds: int = Field(default=24 * 3600, ge=0, description=(
        "After a secret rotation, deliveries are signed with the old secret too for this long."))


class TrackerSettings(BaseModel):
    """Experiment trackers of training jobs (README, "Experiment trackers"). A job's wandb integration
    logs to W&B: online where an API key is configured here, else offline to a run directory on the
    worker that `wandb sync` uploads later. With TUNEFORGE_MLFLOW_TRACKING_URI every job logs to MLflow.
    A tracker that fails never fails the job: an event says so and training goes on."""

    model_config = ConfigDict(frozen=True)

    wandb_mode: Literal["auto", "online", "offline"] = Field(default="auto", description=(
        "auto: online when wandb_api_key is set, else offline."))
    wandb_api_key: SecretStr | None = Field(default=None, description="The W&B API key runs are synced with.")
    wandb_base_url: str | None = Field(default=None, description=(
        "A self-hosted W&B server's URL; unset: W&B's own."))
    wandb_dir: Path | None = Field(default=None, description=(
        "Where W&B run directories are written on the worker; unset: data_dir/trackers/wandb."))
    wandb_init_timeout_seconds: float = Field(default=60.0, gt=0, description=(
        "Longest wait for W&B to start a run before the job goes on without it."))
    mlflow_experiment: str = Field(default="tuneforge", min_length=1, description=(
        "The MLflow experiment jobs' runs are created in."))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEFORGE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Field(default=Path(".tuneforge"), description="Root of storage, SQLite and the embedded broker.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite in data_dir when unset.")
    broker_url: str | None = Field(default=None,
                                   description="Celery broker URL; filesystem broker in data_dir when unset.")
    storage_url: str | None = Field(default=None, description=(
        "Blob storage: s3://bucket/prefix for an S3-compatible store (TUNEFORGE_S3__*); unset: the "
        "directory data_dir/storage."))

    upload_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest accepted upload, in bytes.")
    upload_max_line_bytes: int = Field(default=8 * 1024 * 1024, gt=0, description="Longest accepted JSONL line.")
    upload_max_errors: int = Field(default=10, gt=0, description="How many line errors a refused upload reports.")
    request_max_bytes: int = Field(default=1024 * 1024, gt=0, description=(
        "Largest request body of every route except uploads (JSON), in bytes; enforced on the raw stream."))

    training_queue: str = Field(default="training", min_length=1)
    evaluation_queue: str = Field(default="evaluation", min_length=1,
                                  description="Queue of the CPU workers that run model-written code.")
    allow_weak_sandbox: bool = Field(default=False, description=(
        "Run evaluations without bubblewrap (resource limits only) where it cannot start. Off: refuse."))
    worker_heartbeat_seconds: float = Field(default=2.0, gt=0)
    # How long a queued job may wait undelivered before a worker re-dispatches it
    # (covers an enqueue that failed after the job's row was committed).
    redispatch_after_seconds: float = Field(default=30.0, gt=0)
    # Leases (README, "Leases and recovery"): a running job's worker renews its lease every
    # worker_heartbeat_seconds; the reaper requeues a job whose lease is lease_seconds stale.
    lease_seconds: float = Field(default=30.0, gt=0, description="How long a running job's lease lasts unrenewed.")
    reaper_interval_seconds: float = Field(default=5.0, gt=0, description="How often each worker reaps expired leases.")
    max_attempts: int = Field(default=3, ge=1, description="Claims of a job whose worker died before it is failed.")
    visibility_timeout_seconds: int = Field(default=6 * 3600, gt=0, description=(
        "Redis redelivers an unacknowledged message after this long; leases, not this, recover jobs."))
    stop_wait_seconds: float = Field(default=5.0, ge=0, description=(
        "How long cancel/pause of a running job waits for its worker to act before answering."))

    quotas: QuotaDefaults = Field(default_factory=QuotaDefaults)  # TUNEFORGE_QUOTAS__STORAGE_BYTES, ...
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)  # TUNEFORGE_RATE_LIMIT__PER_SECOND
    concurrency: ConcurrencySettings = Field(default_factory=ConcurrencySettings)  # TUNEFORGE_CONCURRENCY__PER_KEY
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)  # TUNEFORGE_DATABASE__POOL_SIZE
    limits: RequestLimits = Field(default_factory=RequestLimits)  # TUNEFORGE_LIMITS__LORA_R, ...
    uploads: UploadSettings = Field(default_factory=UploadSettings)  # TUNEFORGE_UPLOADS__PART_MAX_BYTES, ...
    cache: CacheSettings = Field(default_factory=CacheSettings)  # TUNEFORGE_CACHE__MAX_BYTES, ...
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)  # TUNEFORGE_METRICS__WORKER_PORT, ...
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)  # TUNEFORGE_WEBHOOKS__ALLOW_PRIVATE, ...
    storage: StorageSettings = Field(default_factory=StorageSettings)  # TUNEFORGE_STORAGE__PRESIGNED_DOWNLOADS
    s3: S3Settings = Field(default_factory=S3Settings)  # TUNEFORGE_S3__ENDPOINT_URL, ...
    mlflow_tracking_uri: str | None = Field(default=None, description=(
        "When set, every training job logs its spec, metrics per step and final status to this MLflow "
        "tracking URI (a local file store file:///..., or a tracking server's http(s) URL)."))
    trackers: TrackerSettings = Field(default_factory=TrackerSettings)  # TUNEFORGE_TRACKERS__WANDB_API_KEY, ...
    log_format: Literal["text", "json"] = Field(default="text", description=(
        "text: the processes' usual log lines; json: one JSON object a line, with the request id, team id "
        "and job id where known."))

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        scheme, sep, rest = v.partition("://")
        bucket = rest.split("/", 1)[0]
        if scheme != "s3" or not sep or not bucket:
            raise ValueError(f"storage_url must look like s3://bucket or s3://bucket/prefix; got {v!r}")
        return v

    @property
    def s3_location(self) -> tuple[str, str] | None:
        """(bucket, key prefix without slashes at its ends) of S3 storage, or None for the local directory."""
        if self.storage_url is None:
            return None
        bucket, _, prefix = self.storage_url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'tuneforge.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_transport_options(self) -> dict:
        if self.broker_url:
            return {}
        folder = self.data_dir / "broker"
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # kombu's default control folder is relative to the working directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
