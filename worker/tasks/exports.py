"""exports.run: claim the export, write it (worker.export), store it, record the outcome.

Idempotent: the claim is one conditional UPDATE, so a redelivered message for an export that is
running (leased) or has ended writes nothing. The lease is renewed by a heartbeat while the model
is merged and written; a worker that lost it (the reaper requeued the export, or it was deleted)
deletes what it stored and records nothing. Each step is one short transaction: claim, inputs,
then succeed or fail.
"""

from __future__ import annotations

import logging
import tarfile
import time
import traceback
from pathlib import Path

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.queue import EXPORT_TASK
from app.core.storage import get_storage
from app.domains.exports import service as exports
from app.domains.exports.service import ExportInputs
from app.domains.exports.states import ExportFormat, ExportStatus
from app.domains.quotas import service as quotas
from app.domains.quotas.errors import StorageFull
from worker.celery_app import app
from worker.export.gguf_writer import GGUFExportError, write_gguf
from worker.export.merge import merged_model, tokenizer_for, write_merged
from worker.lease import Lease, claim_work_dir, retry_db
from worker.staging import stage_base, stage_tree

log = logging.getLogger("tuneforge.worker")


def build(inputs: ExportInputs, work_dir: Path) -> Path:
    """Write the export's file under work_dir from the staged base and adapter; returns it."""
    base_dir, adapter_dir = stage_base(inputs.base_path), stage_tree(inputs.adapter_files_prefix)
    name = inputs.storage_key.rsplit("/", 1)[-1]
    if inputs.format == ExportFormat.GGUF:
        model = merged_model(base_dir, adapter_dir)
        return write_gguf(model, tokenizer_for(base_dir, adapter_dir), work_dir / name,
                          quantization=inputs.precision, name=f"{inputs.base_model}+{inputs.export_id}")
    model_dir = write_merged(base_dir, adapter_dir, work_dir / "model", dtype=inputs.precision)
    archive = work_dir / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname=".")
    return archive


@app.task(name=EXPORT_TASK)
def run(export_id: str) -> str:
    """Write one export. Returns 'not-claimed', 'succeeded', 'failed' (also over the team's storage
    quota: code storage_quota_exceeded) or 'lost' (the lease was lost; nothing recorded)."""
    settings = get_settings()
    with session_scope() as session:
        token = exports.claim(session, export_id=export_id, lease_seconds=settings.lease_seconds,
                              max_attempts=settings.max_attempts)
    if token is None:
        return "not-claimed"
    with claim_work_dir(export_id, token) as work_dir:
        return _run(export_id, token, work_dir)


def _run(export_id: str, token: str, work_dir: Path) -> str:
    settings = get_settings()
    lease = Lease(f"export {export_id}", token, lambda session: exports.renew(
        session, export_id=export_id, lease_token=token, lease_seconds=settings.lease_seconds))
    try:
        with session_scope() as session:
            inputs = exports.inputs(session, export_id)
        with lease:
            started = time.monotonic()
            try:
                path = build(inputs, work_dir)
            except GGUFExportError as exc:
                return _fail(export_id, token, "unsupported_model", str(exc))
            except Exception as exc:
                log.error("export %s failed:\n%s", export_id, traceback.format_exc())
                return _fail(export_id, token, "export_error", f"{type(exc).__name__}: {exc}")
            if lease.lost.is_set():
                return "lost"
            blob = get_storage().put_file(path, inputs.storage_key)
            log.info("export %s (%s %s) written in %.1f s: %d bytes", export_id, inputs.format, inputs.precision,
                     time.monotonic() - started, blob.bytes)

        def record() -> str:
            with session_scope() as session:
                try:  # under the team's lock until this transaction ends
                    quotas.check_stored(session, team_id=inputs.team_id, size=blob.bytes, what="this export")
                except StorageFull as full:
                    done = exports.fail(session, export_id=export_id, lease_token=token,
                                        code="storage_quota_exceeded", message=full.message)
                    return "over-quota" if done else "lost"
                done = exports.succeed(session, export_id=export_id, lease_token=token, size=blob.bytes,
                                       sha256=blob.sha256)
                return str(ExportStatus.SUCCEEDED) if done else "lost"

        outcome = retry_db(record)
        if outcome in ("lost", "over-quota"):
            get_storage().delete(inputs.storage_key)
        return str(ExportStatus.FAILED) if outcome == "over-quota" else outcome

    except LookupError as exc:  # its adapter or base model went away after it was queued
        return _fail(export_id, token, "export_error", str(exc))


def _fail(export_id: str, token: str, code: str, message: str) -> str:
    with session_scope() as session:
        done = exports.fail(session, export_id=export_id, lease_token=token, code=code, message=message)
    return str(ExportStatus.FAILED) if done else "lost"
