"""The API process: create_app() wires routers, error handlers and health checks.
It never imports torch, transformers or the worker: work is dispatched by task name."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api import errors, ui
from app.api.audit import AuditMiddleware
from app.api.concurrency import InFlightMiddleware
from app.api.deps import rate_limit
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import MetricsMiddleware
from app.api.metrics import router as metrics_router
from app.api.request_log import RequestIdMiddleware, bind_log_context
from app.api.request_checks import refuse_bad_input
from app.api.v1 import adapters, evaluations, files, jobs, models, uploads
from app.api.v1 import completions, inference
from app.api.v1 import audit, keys, quotas
from app.api.v1 import webhooks
from app.api.v1 import exports
from app.core import logs, queue
from app.core.config import get_settings
from app.core.db import get_engine
from app.core.storage import get_storage

log = logging.getLogger("tuneforge.api")


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Sync routes and database calls run on anyio's threads: as many as the pool has room for
    # (settings.database), not anyio's default of 40.
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().database.api_threads
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="Fine-tuning as a service: upload JSONL datasets, run QLoRA jobs, download LoRA adapters. "
                    "OpenAI-compatible: point the openai client at /v1 with a team key.",
        lifespan=_lifespan,
    )
    logs.configure(get_settings().log_format)
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(InFlightMiddleware)  # the key's in-flight limit, before any database access
    app.add_middleware(AuditMiddleware)  # after the body limit, so the audit log sees its refusals too
    # Outermost: every request gets its id, its count and its time, the inner middlewares' refusals included.
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    # After the key and its rate limit, so that bad input from no key still answers 401.
    v1 = APIRouter(prefix="/v1",
                   dependencies=[Depends(rate_limit), Depends(bind_log_context), Depends(refuse_bad_input)],
                   responses=errors.RESPONSES)
    for module in (files, uploads, jobs, adapters, models, evaluations):
        v1.include_router(module.router)
    for module in (completions, inference):
        v1.include_router(module.router)
    for module in (keys, audit, quotas):
        v1.include_router(module.router)
    v1.include_router(webhooks.router)
    v1.include_router(exports.router)
    app.include_router(v1)
    app.include_router(metrics_router)
    ui.install(app)  # the dashboard at /ui, calling /v1 from the browser

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """503 unless the database, the broker and storage all answer."""
        checks = {"database": _check_database, "broker": _check_broker, "storage": _check_storage}
        results = {}
        for name, check in checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # report, never raise: this is the probe
                # The probe needs no key: the reason (hosts, ports, paths) goes to the log, not the answer.
                log.warning("readiness check %s failed: %s", name, exc)
                results[name] = f"unavailable: the {name} did not answer; the server log has the reason"
        ok = all(v == "ok" for v in results.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", **results}, status_code=200 if ok else 503)

    return app


def _check_database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_broker() -> None:
    with queue.client().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_storage() -> None:
    get_storage().check()
