"""One Settings class for the API and the worker (env prefix `LAYERSCOPE_`).

`DATABASE_URL` and `REDIS_URL` are also read without the prefix, as every
platform sets them. With neither set the service runs embedded: SQLite in the
data directory and an in-process worker.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Public (it is in this file): fine for embedded use on one machine, refused by served mode.
DEV_KEY_PEPPER = "layerscope-dev-pepper"

JUDGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class JudgeEndpoint(BaseModel):
    """A correctness judge the operator offers: an OpenAI-compatible chat-completions endpoint.

    Where judges live and which secret each sends is server configuration (LAYERSCOPE_JUDGES);
    a spec only names one (`stages.hallucination.judge.name`). The URL is trusted as the
    operator's: it may be a private address (a judge served next to the workers)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        min_length=8, max_length=512, pattern=r"^https?://\S+$",
        description="e.g. `https://api.openai.com/v1`; the judge posts to `{base_url}/chat/completions`.",
    )
    model: str = Field(min_length=1, max_length=256)
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="The worker's environment variable holding this judge's API key (sent as a Bearer token).",
    )
    timeout_s: float = Field(30.0, gt=0, le=600)
    retries: int = Field(1, ge=0, le=5)


def unknown_judge(name: str, judges: dict[str, JudgeEndpoint]) -> str:
    """Why `name` cannot be used, for a 422 or a failed job (names only, never URLs or keys)."""
    if not judges:
        return (f"no judge named {name!r}: this server has no judges configured "
                "(an operator adds them with LAYERSCOPE_JUDGES)")
    return f"no judge named {name!r} on this server; configured judges: {', '.join(sorted(judges))}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAYERSCOPE_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(
        None, validation_alias=AliasChoices("LAYERSCOPE_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: str | None = Field(None, validation_alias=AliasChoices("LAYERSCOPE_REDIS_URL", "REDIS_URL"))
    data_dir: Path = Path(".layerscope")

    # Security. Auth is on unless switched off explicitly for local use.
    auth_disabled: bool = False
    key_pepper: str = Field(
        DEV_KEY_PEPPER, description="HMAC key for stored API-key hashes. Served mode refuses the built-in "
        "default: with it, anyone holding a copy of the database can check guesses of the keys offline.",
    )
    allow_dev_pepper: bool = Field(
        False, description="Served mode starts on the built-in pepper anyway, with a warning (throwaway setups).",
    )
    key_cache_seconds: float = Field(
        5.0, description="An API process reuses a key lookup this long; another replica sees a revocation "
        "within it (the one that revoked, at once). 0: look the key up on every request.",
    )
    default_project: str = "default"

    # Where local models and data files may come from (no `../` escapes).
    model_roots: list[Path] = Field(default_factory=list)
    data_roots: list[Path] = Field(default_factory=list)
    trust_remote_code_allowlist: list[str] = Field(default_factory=list)
    # Correctness judges (the `judge` rule of the hallucination stage): name -> endpoint, model and the
    # environment variable with its key, as JSON. Only these endpoints are ever called; a spec names one.
    judges: dict[str, JudgeEndpoint] = Field(default_factory=dict)
    max_data_file_bytes: int = 512 * 1024 * 1024

    # Large artifacts (over 16 MB, e.g. a mitigation patch): one store every worker and API replica
    # reads (app/artifact_store.py). Unset: <data_dir>/artifacts, for one machine.
    artifact_store: str | None = Field(
        None, description="A shared directory (or file:///path) mounted on every machine, or "
        "s3://bucket/prefix (S3-compatible, through boto3; credentials from the AWS_* variables).",
    )
    artifact_s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible server (MinIO, Ceph, ...); unset for AWS S3.",
    )

    # Job control (seconds). soft < hard < broker visibility timeout.
    job_soft_time_limit: int = 6 * 3600
    job_hard_time_limit: int = 6 * 3600 + 300
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    sweep_interval: float = 10.0
    requeue_after: float = 30.0
    max_attempts: int = 3

    # Queue routing (app/routing.py): a `device: auto` job whose weights in float32 (or the requested
    # dtype) are over this many GB goes to the `gpu` queue instead of `cpu`.
    cpu_max_model_gb: float = Field(8.0, gt=0)

    # API limits. Rate: requests per minute per API key (bursts up to a sixth of it); 0 switches it off.
    rate_limit_per_minute: int = 1200
    max_page_size: int = 200
    max_body_bytes: int = 8 * 1024 * 1024
    # Requests worked on at once per API process (the rest wait in order). At most the database pool's
    # 10 steady connections, so a burst neither times out on the pool nor churns overflow connections.
    # 0 switches the limit off.
    max_inflight_requests: int = 10

    # Webhooks (SSRF: the service POSTs to URLs that admin keys register). With an allow-list only those
    # hosts (`example.com`, `*.example.com`, an IP) are accepted; without one any host is, except those
    # resolving to loopback/private/link-local/reserved addresses unless allow_private_networks is true.
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_allow_private_networks: bool = False
    webhook_timeout: float = 5.0
    webhook_max_attempts: int = 12
    webhook_backoff_base: float = 10.0
    webhook_backoff_max: float = 3600.0
    webhook_event_window: float = 86400.0

    # Model registry (MLflow; `pip install layerscope[mlflow]`). Credentials are MLflow's own variables
    # (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN) in the worker's environment, never settings.
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("LAYERSCOPE_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="The MLflow tracking server (e.g. `http://mlflow:5000`); unset: specs naming MLflow are refused.",
    )
    mlflow_registry_uri: str | None = Field(None, description="The model registry, when not the tracking server.")
    mlflow_experiment: str = Field("layerscope", min_length=1, max_length=256,
                                   description="Experiment the analysis runs are logged under.")
    mlflow_timeout: float = Field(15.0, gt=0, description="Seconds per MLflow HTTP request.")
    mlflow_http_retries: int = Field(
        1, ge=0, le=10, description="MLflow's own retries per request; the outbox retries the whole update later.",
    )
    # Registry updates (the outbox `registry_updates`): retried with backoff like webhook deliveries.
    registry_max_attempts: int = Field(12, ge=1)
    registry_backoff_base: float = Field(10.0, gt=0)
    registry_backoff_max: float = Field(3600.0, gt=0)

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store(cls, value: str | None) -> str | None:
        from app.artifact_store import parse_store

        parse_store(value, Path("."))  # a bad URL fails at start, not at the first large artifact
        return value or None

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, value: dict[str, JudgeEndpoint]) -> dict[str, JudgeEndpoint]:
        bad = [name for name in value if not re.match(JUDGE_NAME, name)]
        if bad:
            raise ValueError(f"judge names must match {JUDGE_NAME}: {bad}")
        return value

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    @property
    def served(self) -> bool:
        """A database URL or a broker is set: the keys stored are used by other people and machines."""
        return self.database_url is not None or self.redis_url is not None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # Plain postgres URLs get the psycopg 3 driver.
            for prefix in ("postgres://", "postgresql://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{(self.data_dir / 'layerscope.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def visibility_timeout(self) -> int:
        return self.job_hard_time_limit + 600


@lru_cache
def get_settings() -> Settings:
    return Settings()
