"""The API process: create_app() wires routers, error handlers and health checks.
It never imports torch, transformers or the worker: work is dispatched by task name."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api import errors
from app.api.v1 import adapters, evaluations, files, jobs, models
from app.core.db import get_engine


def create_app() -> FastAPI:
    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="Fine-tuning as a service: upload JSONL datasets, run QLoRA jobs, download LoRA adapters. "
                    "OpenAI-compatible: point the openai client at /v1 with a team key.",
    )
    errors.install(app)
    v1 = APIRouter(prefix="/v1")
    for module in (files, jobs, adapters, models, evaluations):
        v1.include_router(module.router)
    app.include_router(v1)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # report, never raise: this is the probe
            return JSONResponse({"status": "unavailable", "database": str(exc)[:200]}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app
