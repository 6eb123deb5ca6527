"""The ``distillery`` command: run, serve, worker, migrate, sweep, keys.

``distillery run`` is what ``make run`` calls: it migrates, then starts the API and one worker as
child processes and stops both cleanly on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.settings import get_settings


def migrate() -> None:
    """Bring the database schema to the newest migration (Alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    command.upgrade(cfg, "head")


def _worker_queues() -> str:
    settings = get_settings()
    if settings.worker_queues:
        return settings.worker_queues
    if settings.device == "cuda":
        return "gpu"
    if settings.device == "cpu":
        return "cpu"
    import torch  # only the worker command pays for this import; the API never does

    # Reading the device count does not create a CUDA context, and exec() below replaces this
    # process anyway, so nothing forks after CUDA initialises.
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_sandbox() -> str:
    """Resolve DISTILLERY_SANDBOX once at start: ``bwrap`` refuses to start without bubblewrap, ``auto``
    falls back to plain child processes with a loud warning (app.sandbox). Returns the mode in use."""
    from app import sandbox

    mode = sandbox.resolve_mode(get_settings().sandbox)
    print(f"distillery: uploads and jobs run in the '{mode}' sandbox", file=sys.stderr)
    return mode


def worker() -> None:
    """Replace this process with a Celery worker: one process, solo pool (one job at a time per GPU)."""
    check_sandbox()
    queues = _worker_queues()
    args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
            "--queues", queues, "--loglevel", "INFO", "--hostname", f"distillery-{queues}-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    os.execv(sys.executable, args)


def serve() -> None:
    import uvicorn

    from app import metrics_dir

    settings = get_settings()
    check_sandbox()
    # The server's processes sum their samples in one directory: start it empty (counters start with the server).
    metrics_dir.prepare(settings)
    # SIGTERM: uvicorn stops accepting, lets in-flight requests finish for at most the grace period, then
    # closes what is left (an SSE follower would otherwise hold shutdown open forever). With several
    # workers each is its own process with its own pool (sized per process) and key cache.
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info",
                workers=settings.api_workers, timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
                timeout_keep_alive=5)


def run() -> int:
    """Migrate, then run API + worker until either exits or we are told to stop."""
    settings = get_settings()
    migrate()
    children = [subprocess.Popen([sys.executable, "-m", "app.cli", "serve"]),
                subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])]
    print(f"Distillery API listening on http://{settings.host}:{settings.port}  (docs: /docs)", flush=True)
    print(f"Database: {_redact(settings.resolved_database_url)}  Broker: {_redact(settings.resolved_broker_url)}  "
          f"Data: {settings.data_dir}", flush=True)
    print("Create an API key:  .venv/bin/distillery keys create --tenant my-team", flush=True)
    stopping = False

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    while not stopping:
        dead = [c for c in children if c.poll() is not None]
        if dead:
            code = dead[0].returncode or 1
            print(f"a Distillery process exited with code {dead[0].returncode}; stopping", file=sys.stderr)
            break
        time.sleep(0.3)
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)  # uvicorn and celery both shut down gracefully on TERM
    deadline = time.monotonic() + settings.shutdown_grace_seconds + 5  # workers checkpoint and release first
    for c in children:
        try:
            c.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            c.kill()
    return 0 if stopping else code


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def sweep() -> None:
    """One sweep now: what the API does at start and every DISTILLERY_SWEEP_INTERVAL_SECONDS (app.sweep)."""
    from app.sweep import run_once

    print(run_once(get_settings()).summary())


def keys_create(tenant: str) -> None:
    from app.auth import create_key
    from app.db.session import session_scope

    with session_scope() as s:
        row, plaintext = create_key(s, tenant)
    print(f"Created API key {row.id} for tenant '{tenant}'. It is shown once; store it now:", file=sys.stderr)
    print(plaintext)


def keys_revoke(key_id: str) -> None:
    from app.auth import revoke_key
    from app.db.session import session_scope

    with session_scope() as s:
        revoke_key(s, key_id)
    print(f"Revoked {key_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillery", description="Distillation as a service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="migrate, then run the API and one worker (embedded default: SQLite + local queue)")
    sub.add_parser("serve", help="run the HTTP API")
    sub.add_parser("worker", help="run one worker process (queue 'gpu' when CUDA is present, else 'cpu')")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("sweep", help="remove stale temp uploads, .partial files, orphan blobs and checkpoints once")
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key (and the tenant if new); prints the key last")
    create.add_argument("--tenant", required=True)
    revoke = keys.add_parser("revoke", help="revoke a key by id (key_…)")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    from app.errors import DomainError
    from app.sandbox import SandboxUnavailable

    try:
        if args.command == "run":
            return run()
        if args.command == "serve":
            serve()
        elif args.command == "worker":
            worker()
        elif args.command == "migrate":
            migrate()
        elif args.command == "sweep":
            sweep()
        elif args.command == "keys" and args.keys_command == "create":
            migrate()
            keys_create(args.tenant)
        elif args.command == "keys" and args.keys_command == "revoke":
            keys_revoke(args.key_id)
    except DomainError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
