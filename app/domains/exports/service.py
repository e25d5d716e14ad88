"""Exports: an adapter written out as merged safetensors or a GGUF file, by a worker.

States (ExportStatus): queued -> running -> succeeded | failed. create() records a queued export and
sends it to the export task after commit; claims and final writes are conditional updates under a
lease (app.core.leases), so a redelivered message writes nothing twice. reap() requeues (or, after
max_attempts claims, fails) running exports whose lease expired, and redispatch_stale() re-sends
queued ones whose message may have been lost. A succeeded export's bytes count toward the team's
storage quota: the quotas domain sums them (and so imports this domain's model); the callers check
it (quotas.check_room before create, quotas.check_stored before succeed), so this domain does not
import quotas back."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import leases, queue
from app.core.db import get_owned, unix, utcnow
from app.core.ids import new_id
from app.core.pagination import paginate
from app.domains.adapters import service as adapters
from app.domains.adapters.models import Adapter
from app.domains.base_models import service as base_models
from app.domains.exports.errors import ExportInvalid, ExportNotFound
from app.domains.exports.models import AdapterExport
from app.domains.exports.schemas import ExportCreate, ExportList, ExportRead
from app.domains.exports.states import GGUF_ARCHITECTURES, ExportFormat, ExportStatus


@dataclass(frozen=True)
class ExportInputs:
    """What a worker needs to write an export: where the base and the adapter are, and what to write."""

    export_id: str
    team_id: str
    format: str
    precision: str
    base_model: str
    base_path: str
    adapter_files_prefix: str
    storage_key: str


def filename(*, export_id: str, format: str, precision: str) -> str:
    """The download's file name: a .tar.gz of the merged directory, or the .gguf itself."""
    return f"{export_id}-{precision}.gguf" if format == ExportFormat.GGUF else f"{export_id}-{precision}.tar.gz"


def storage_key(*, adapter_prefix: str, export_id: str, name: str) -> str:
    """Under the adapter's prefix: deleting the adapter deletes its exports' blobs with it."""
    return f"{adapter_prefix}/exports/{export_id}/{name}"


def create(session: Session, *, team_id: str, adapter_id: str, body: ExportCreate) -> AdapterExport:
    """Validate and record a queued export of the team's adapter; it is enqueued after commit.
    Raises AdapterNotFound (404, also for another team's), ExportInvalid (400) for a precision that
    does not fit the format or a GGUF of a base that is not Llama-family."""
    # The adapter first: another team's id answers 404 whatever the body says, as a missing one does.
    adapter = adapters.get(session, team_id=team_id, adapter_id=adapter_id)
    if body.format == ExportFormat.MERGED and body.quantization is not None:
        raise ExportInvalid("quantization applies to format 'gguf'; a merged export takes dtype "
                            "(bfloat16, float16 or float32).", param="quantization")
    if body.format == ExportFormat.GGUF and body.dtype is not None:
        raise ExportInvalid("dtype applies to format 'merged'; a gguf export takes quantization (f16 or q8_0).",
                            param="dtype")
    base = base_models.get_base(session, adapter.base_model)
    if base is None:
        raise ExportInvalid(f"The adapter's base model {adapter.base_model!r} is no longer registered; an export "
                            "needs its weights.", param="adapter_id", code="model_not_found")
    if body.format == ExportFormat.GGUF and base.architecture not in GGUF_ARCHITECTURES:
        raise ExportInvalid(f"GGUF exports are written for Llama-family bases ({', '.join(GGUF_ARCHITECTURES)}); "
                            f"this adapter's base {base.id!r} is {base.architecture!r}. Export it as "
                            "format 'merged' instead.", param="format", code="unsupported_architecture")
    export_id = new_id("ftexport")
    row = AdapterExport(id=export_id, team_id=team_id, adapter_id=adapter.id, format=body.format,
                        precision=body.precision, status=ExportStatus.QUEUED,
                        storage_key=storage_key(adapter_prefix=adapter.storage_prefix, export_id=export_id,
                                                name=filename(export_id=export_id, format=body.format,
                                                              precision=body.precision)))
    session.add(row)
    session.flush()
    queue.after_commit(session, queue.enqueue_export, row.id)
    return row


def get(session: Session, *, team_id: str, export_id: str) -> AdapterExport:
    """The team's export. Raises ExportNotFound for a missing id and for another team's, alike."""
    row = get_owned(session, AdapterExport, export_id, team_id)
    if row is None:
        raise ExportNotFound(f"No such export: {export_id!r}.", param="export_id")
    return row


def list_page(session: Session, *, team_id: str, adapter_id: str, after: str | None, limit: int) -> ExportList:
    """The adapter's exports, newest first. Raises AdapterNotFound for another team's adapter."""
    adapters.get(session, team_id=team_id, adapter_id=adapter_id)
    rows, has_more = paginate(session, select(AdapterExport).where(AdapterExport.adapter_id == adapter_id),
                              AdapterExport.id, after=after, limit=limit)
    return ExportList(data=[to_read(r) for r in rows], has_more=has_more)


def delete(session: Session, *, team_id: str, export_id: str) -> None:
    """Delete the row; its blob is removed after commit (a running export's worker finds its lease
    gone and deletes what it wrote)."""
    row = get(session, team_id=team_id, export_id=export_id)
    session.delete(row)
    session.flush()
    queue.delete_after_commit(session, row.storage_key)


def claim(session: Session, *, export_id: str, lease_seconds: float, max_attempts: int) -> str | None:
    """Move a queued export with attempts left to running under a new lease; its token, or None when
    another worker holds it, it has ended, or it is gone."""
    token, won = leases.claim(session, AdapterExport, ids=[export_id], queued=ExportStatus.QUEUED,
                              running=ExportStatus.RUNNING, lease_seconds=lease_seconds,
                              max_attempts=max_attempts, started_at=utcnow())
    return token if won else None


def inputs(session: Session, export_id: str) -> ExportInputs:
    """The claimed export's inputs. Raises LookupError when its adapter or base model went away."""
    row = session.get(AdapterExport, export_id)
    adapter = session.get(Adapter, row.adapter_id) if row is not None else None
    base = base_models.get_base(session, adapter.base_model) if adapter is not None else None
    if row is None or adapter is None or base is None:
        raise LookupError(f"export {export_id}: its adapter or base model is gone")
    return ExportInputs(export_id=row.id, team_id=row.team_id, format=row.format, precision=row.precision,
                        base_model=base.id, base_path=base.path,
                        adapter_files_prefix=adapters.files_prefix(adapter.storage_prefix),
                        storage_key=row.storage_key)


def renew(session: Session, *, export_id: str, lease_token: str, lease_seconds: float) -> bool:
    return leases.renew(session, AdapterExport, ids=[export_id], running=ExportStatus.RUNNING,
                        lease_token=lease_token, lease_seconds=lease_seconds)


def succeed(session: Session, *, export_id: str, lease_token: str, size: int, sha256: str) -> bool:
    """The holder's final write once the blob is stored (check the team's storage quota first, in
    the same transaction). False when the lease no longer holds: nothing written, and the caller
    deletes the blob."""
    return leases.finish(session, AdapterExport, id=export_id, running=ExportStatus.RUNNING,
                         lease_token=lease_token, status=ExportStatus.SUCCEEDED, finished_at=utcnow(),
                         bytes=size, sha256=sha256)


def fail(session: Session, *, export_id: str, lease_token: str, code: str, message: str) -> bool:
    """Final, by the lease holder only; False (nothing written) otherwise."""
    return leases.finish(session, AdapterExport, id=export_id, running=ExportStatus.RUNNING,
                         lease_token=lease_token, status=ExportStatus.FAILED, finished_at=utcnow(),
                         error={"code": code, "message": message[:2000]})


def reap(session: Session, *, max_attempts: int) -> list[str]:
    """Take back running exports whose lease expired: failed (lease_expired) after max_attempts
    claims, else queued again and re-sent after commit. Returns the requeued ids."""
    running, now = ExportStatus.RUNNING, utcnow()
    leases.reap(session, AdapterExport, running=running, status=ExportStatus.FAILED,
                where=(AdapterExport.attempts >= max_attempts,), finished_at=now, error={
                    "code": "lease_expired",
                    "message": f"The export was given up: its worker stopped renewing its lease on all "
                               f"{max_attempts} attempts (max_attempts {max_attempts})."})
    requeued = [r.id for r in leases.reap(session, AdapterExport, running=running, status=ExportStatus.QUEUED,
                                          enqueued_at=now)]
    for export_id in requeued:
        queue.after_commit(session, queue.enqueue_export, export_id)
    return requeued


def redispatch_stale(session: Session, *, older_than: dt.datetime) -> list[str]:
    """Re-send, after commit, queued exports last enqueued (or created) before older_than."""
    ids = [r.id for r in leases.take_stale(session, AdapterExport, queued=ExportStatus.QUEUED,
                                           older_than=older_than)]
    for export_id in ids:
        queue.after_commit(session, queue.enqueue_export, export_id)
    return ids


def to_read(row: AdapterExport) -> ExportRead:
    merged = row.format == ExportFormat.MERGED
    return ExportRead(id=row.id, created_at=unix(row.created_at) or 0, adapter_id=row.adapter_id, format=row.format,
                      dtype=row.precision if merged else None, quantization=None if merged else row.precision,
                      status=row.status, filename=row.storage_key.rsplit("/", 1)[-1], bytes=row.bytes,
                      sha256=row.sha256, error=row.error, finished_at=unix(row.finished_at))
