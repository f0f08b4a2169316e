"""`layerscope`: run the service (serve, worker, migrate), manage keys, and run the demo."""

from __future__ import annotations

import os
import sys

import typer

from app.config import DEV_KEY_PEPPER, Settings, get_settings
from cli import client, health, policies

app = typer.Typer(help="layerscope: which layers of a transformer matter, which can be pruned, which hallucinate.",
                  no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Manage API keys (writes to the database directly).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
client.register(app)
policies.register(app)
health.register(app)


def _logging() -> None:
    from app.logs import configure_logging

    configure_logging(os.environ.get("LAYERSCOPE_LOG_LEVEL", "INFO"),
                      json_format=os.environ.get("LAYERSCOPE_LOG_FORMAT", "json") == "json")


def _prepare(settings: Settings, migrate: bool) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        from app.migrate import upgrade

        upgrade(settings.resolved_database_url)


def _check_pepper(settings: Settings) -> None:
    """Served mode refuses the public default key pepper (LAYERSCOPE_ALLOW_DEV_PEPPER=true: a warning)."""
    if not settings.served or settings.key_pepper != DEV_KEY_PEPPER:
        return
    if settings.allow_dev_pepper:
        typer.echo("WARNING: LAYERSCOPE_KEY_PEPPER is the public default (LAYERSCOPE_ALLOW_DEV_PEPPER=true): "
                   "anyone with a copy of the database can check guesses of the API keys offline.", err=True)
        return
    typer.echo(
        "LAYERSCOPE_KEY_PEPPER is the public default, and DATABASE_URL/REDIS_URL are set (served mode): API keys "
        "would be hashed with a value anyone can read. Set LAYERSCOPE_KEY_PEPPER to a secret (e.g. "
        "`openssl rand -hex 32`), the same for every API process and `keys create`; changing it later "
        "invalidates the stored keys. LAYERSCOPE_ALLOW_DEV_PEPPER=true starts anyway, with a warning.",
        err=True,
    )
    raise typer.Exit(2)


def _say_how_to_get_a_key(settings: Settings) -> None:
    """Embedded serve needs a key like served mode; say how to make one when none exists yet."""
    if settings.auth_disabled:
        return
    from sqlalchemy import func, select

    from app.db import session_factory, session_scope
    from app.models import ApiKey

    with session_scope(session_factory(settings.resolved_database_url)) as session:
        keys = session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))
    if not keys:
        typer.echo(
            "no API key yet: in another shell, with the same LAYERSCOPE_DATA_DIR, run\n"
            f"  layerscope keys create --project {settings.default_project} --scopes read,submit,admin\n"
            "and send it as `Authorization: Bearer <key>` (LAYERSCOPE_AUTH_DISABLED=true turns keys off, "
            "for local use only)."
        )


def start_embedded_worker(api, settings: Settings):  # noqa: ANN001, ANN201
    """Start the in-process worker that runs queued jobs when no broker is configured."""
    from worker.service.embedded import EmbeddedWorker

    worker = EmbeddedWorker(api.state.session_factory, settings, api.state.enqueuer)
    worker.start()
    return worker


def api_factory():  # noqa: ANN201
    """The app factory each API process of `serve --workers N` (N > 1) calls: logging as `serve`
    configures it, settings from the environment (the same environment as the parent's)."""
    from app.main import create_app

    _logging()
    return create_app(get_settings())


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    workers: int = typer.Option(
        1, min=1,
        help="API processes on the port (uvicorn workers). More than 1 needs served mode (REDIS_URL set; "
        "`layerscope worker` runs the jobs). Each process has its own rate limits, API-key cache and "
        "HTTP latency metrics.",
    ),
    migrate: bool = typer.Option(
        None, help="Upgrade the database schema first (default: yes in embedded mode, no otherwise)."
    ),
) -> None:
    """Run the HTTP API. With no DATABASE_URL/REDIS_URL: SQLite plus an in-process worker (embedded mode,
    one API process)."""
    import uvicorn

    from app.main import create_app

    _logging()
    settings = get_settings()
    _check_pepper(settings)
    if workers > 1 and settings.embedded:
        typer.echo(
            f"--workers {workers}: embedded mode (no REDIS_URL) runs one API process only, since every process "
            "would start its own in-process worker on the same database. Set REDIS_URL and DATABASE_URL "
            "(served mode, jobs run by `layerscope worker`) to run several API processes.",
            err=True,
        )
        raise typer.Exit(2)
    _prepare(settings, settings.embedded if migrate is None else migrate)
    if workers > 1:
        if settings.auth_disabled:
            typer.echo("WARNING: authentication is OFF (LAYERSCOPE_AUTH_DISABLED=true); local use only.")
        # uvicorn starts worker processes from an import string: each builds its own app (api_factory).
        uvicorn.run("cli.main:api_factory", factory=True, workers=workers, host=host, port=port, log_level="info",
                    log_config=None)
        return
    api = create_app(settings)
    if settings.embedded:
        typer.echo(f"embedded mode: database {settings.resolved_database_url}, in-process worker")
        start_embedded_worker(api, settings)
        _say_how_to_get_a_key(settings)
    if settings.auth_disabled:
        typer.echo("WARNING: authentication is OFF (LAYERSCOPE_AUTH_DISABLED=true); local use only.")
    # log_config=None: uvicorn's own loggers (startup, errors, access lines) go through the root handler
    # that _logging() set, so every line has the one format.
    uvicorn.run(api, host=host, port=port, log_level="info", log_config=None)


@app.command()
def worker(
    concurrency: int = typer.Option(1, help="Jobs at once in this process (solo pool when 1)."),
    loglevel: str = typer.Option("INFO"),
    name: str = typer.Option(
        None, help="Celery node name (`%h` = host name). Default: layerscope-<pid>@<host> "
        "(layerscope-gpu<N>-<pid>@<host> with --gpu), unique per process, so several workers on one host "
        "(one per GPU) are told apart.",
    ),
    gpu: str = typer.Option(
        None, "--gpu", metavar="N",
        help="Pin this worker to GPU N: sets CUDA_VISIBLE_DEVICES=N before torch is imported, so the job "
        "sees it as cuda:0; consumes the `gpu` and `cpu` queues. `--gpu 0,1`: one process that sees both "
        "GPUs (for a model sharded with model.device_map).",
    ),
    gpus: str = typer.Option(
        None, "--gpus", metavar="0,1,...",
        help="Start one worker process per listed GPU, each as `--gpu N` with the other options; a process "
        "that exits is restarted; SIGTERM stops them all.",
    ),
    queues: str = typer.Option(
        None, "--queues", metavar="Q,...",
        help="Queues to consume instead of the default (`cpu`; `gpu,cpu` with --gpu/--gpus): `cpu`, `gpu`.",
    ),
) -> None:
    """Run a Celery worker (needs REDIS_URL and DATABASE_URL). Jobs are routed at submit to the `cpu` or
    `gpu` queue (README, queue routing); a worker without --gpu takes only `cpu` jobs."""
    from cli import gpus as gpu_workers

    settings = get_settings()
    if settings.embedded:
        typer.echo("REDIS_URL is not set: `layerscope serve` runs jobs in-process in embedded mode.", err=True)
        raise typer.Exit(2)
    try:
        if gpu is not None and gpus is not None:
            raise ValueError("give --gpu (one process) or --gpus (one process per GPU), not both")
        ids = gpu_workers.parse_ids(gpus or gpu, "--gpus" if gpus else "--gpu") if (gpu or gpus) else []
        consumed = gpu_workers.parse_queues(queues, gpu=bool(ids))
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if gpus is not None:
        child = [f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
        child += [f"--queues={queues}"] if queues else []
        if name:  # each child its own node name: w@%h -> w-gpu0@%h
            child.append("--name=" + (name.replace("@", "-gpu{gpu}@", 1) if "@" in name else name + "-gpu{gpu}"))
        raise typer.Exit(gpu_workers.supervise(ids, child))
    if ids:
        visible = gpu_workers.pin(ids)
        seen = gpu_workers.visible_cuda_devices()
        typer.echo(f"worker pinned: CUDA_VISIBLE_DEVICES={visible}, {seen} CUDA device(s) visible, "
                   f"queues {','.join(consumed)}")
        if seen == 0:
            typer.echo("WARNING: no CUDA device is visible to this GPU worker; the gpu-queue jobs it takes "
                       "will fail with gpu_unavailable (they are never run on the CPU).", err=True)
    _logging()
    from worker.service.celery_app import celery

    pool = ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
    node = name or (f"layerscope-gpu{'-'.join(ids)}-{os.getpid()}@%h" if ids else f"layerscope-{os.getpid()}@%h")
    celery.worker_main(
        ["worker", f"--loglevel={loglevel}", "-Q", ",".join(consumed), f"--hostname={node}", *pool]
    )


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the latest revision."""
    settings = get_settings()
    _prepare(settings, True)
    typer.echo(f"database at head: {settings.resolved_database_url.split('@')[-1]}")


@keys_app.command("create")
def keys_create(
    project: str = typer.Option(..., help="Project the key belongs to."),
    name: str = typer.Option("cli", help="A label for the key."),
    scopes: str = typer.Option(
        "read,submit",
        help="Comma-separated: read, submit, admin (this project), operator (service-wide: /metrics of every project).",
    ),
) -> None:
    """Create an API key and print it (shown once)."""
    from app.auth import create_key
    from app.db import session_factory, session_scope

    settings = get_settings()
    _check_pepper(settings)
    _prepare(settings, settings.embedded)
    with session_scope(session_factory(settings.resolved_database_url)) as session:
        try:
            key = create_key(session, settings, project, name, [s.strip() for s in scopes.split(",") if s.strip()])
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    project: str = typer.Option(None, help="Only this project's keys (default: every project)."),
) -> None:
    """List API keys: id, project, name, scopes, created, revoked (never the key itself)."""
    from sqlalchemy import select

    from app.db import session_factory, session_scope
    from app.models import ApiKey
    from cli.client import render_table

    settings = get_settings()
    _prepare(settings, settings.embedded)
    with session_scope(session_factory(settings.resolved_database_url)) as session:
        query = select(ApiKey).order_by(ApiKey.project, ApiKey.created_at)
        if project:
            query = query.where(ApiKey.project == project)
        rows = [{"id": k.id, "project": k.project, "name": k.name, "scopes": k.scopes,
                 "created": k.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                 "revoked": k.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if k.revoked_at else "-"}
                for k in session.scalars(query)]
    typer.echo(render_table(rows))


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (from `keys list`).")) -> None:
    """Revoke an API key (in the database): every API process refuses it within LAYERSCOPE_KEY_CACHE_SECONDS
    (5 s by default). Exit 2 if there is no such active key."""
    from sqlalchemy import update

    from app.db import rowcount, session_factory, session_scope
    from app.models import ApiKey, utcnow

    settings = get_settings()
    _prepare(settings, settings.embedded)
    with session_scope(session_factory(settings.resolved_database_url)) as session:
        done = rowcount(session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())))
    if not done:
        typer.echo(f"no active API key {key_id!r}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {key_id}")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model to analyse."),
    dataset: str = typer.Option("chatterbot-conversations", help="Built-in dataset."),
    limit: int = typer.Option(32, help="Examples to profile."),
) -> None:
    """Run one AVSS analysis end to end in embedded mode and print the per-layer table."""
    from cli.demo import run_demo

    sys.exit(run_demo(model=model, dataset=dataset, limit=limit))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
