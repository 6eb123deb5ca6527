"""The ASGI application: ``uvicorn app.main:app``. Importing this module never imports torch."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import prometheus  # first: it sets up the multiprocess metrics dir
from app.api.job_cache import CachedJobReads, start_listener
from app.api.routes import artifacts, datasets, jobs, models, ops, webhooks
from app.api.telemetry import Telemetry
from app.console import serve as console  # the web console's static files (app/console/)
from app.errors import install_error_handlers
from app.api.routes.datasets import DatasetByUri
from jobspec import JobSpec
from app.settings import get_settings
from app.sweep import start_sweeper

DESCRIPTION = """Distillation as a service: upload a teacher and data, queue a job, download a smaller,
faster student with a report of what it kept. Authenticate with `Authorization: Bearer <api key>`
(`distillery keys create --tenant NAME`). Errors are `application/problem+json`."""


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    sweeper = start_sweeper(settings)  # a daemon thread: start-up does not wait for the first sweep
    listener = start_listener(settings)  # the job cache answers once it listens (app/api/job_cache.py)
    app.state.job_cache_listener = listener
    try:
        yield
    finally:
        for thread in (sweeper, listener):
            if thread is not None:
                thread.stop()
        prometheus.process_exit()


def create_app() -> FastAPI:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(title="Distillery", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    for module in (models, datasets, jobs, artifacts, webhooks, ops):
        app.include_router(module.router)
    console.mount(app)  # /console: static files only; every call it makes goes through /v1 and its auth
    # Multipart overhead on top of the file itself is small; allow 1 MiB of slack. Any other body is JSON.
    app.add_middleware(CachedJobReads)  # inside the guard: NUL checks and counting apply to it too
    app.add_middleware(Telemetry, max_body_bytes=settings.max_upload_bytes + 1024 * 1024,
                       max_json_bytes=settings.max_json_body_bytes)

    original_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original_openapi()
            # POST /v1/jobs and the JSON form of POST /v1/datasets read raw bodies (the idempotency hash
            # covers exactly what was sent); publish the schemas they are validated against.
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (JobSpec, DatasetByUri):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


app = create_app()
