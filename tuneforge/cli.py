"""The `tuneforge` command.

    tuneforge up                      API + one worker (embedded default: SQLite, filesystem broker)
    tuneforge serve [--port 8000]     the API process alone
    tuneforge worker                  one Celery worker (training + evaluation queues)
    tuneforge migrate                 alembic upgrade head
    tuneforge admin create-team NAME  prints the team's API key, once
    tuneforge models register NAME PATH | make-tiny PATH | list
    tuneforge demo                    the whole path on a fresh embedded instance

Configuration comes from TUNEFORGE_* environment variables (see README).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _migrate(_: argparse.Namespace) -> int:
    from app.core.migrate import upgrade

    upgrade()
    print("database is at the latest revision")
    return 0


def _serve_cmd(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host,
            "--port", str(port), "--no-access-log"]


def _worker_cmd(concurrency: int, queues: str | None = None) -> list[str]:
    from app.core.config import get_settings

    settings = get_settings()
    queues = queues or f"{settings.training_queue},{settings.evaluation_queue}"
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO",
            "--concurrency", str(concurrency), "-Q", queues, "--hostname", f"worker-{os.getpid()}@%h"]


def _serve(args: argparse.Namespace) -> int:
    os.execv(sys.executable, _serve_cmd(args.host, args.port))


def _worker(args: argparse.Namespace) -> int:
    os.execv(sys.executable, _worker_cmd(args.concurrency, args.queues))


def _up(args: argparse.Namespace) -> int:
    """Run the API and one worker until interrupted; stop both on SIGINT/SIGTERM or when one dies."""
    _migrate(args)
    procs = [subprocess.Popen(_serve_cmd(args.host, args.port)), subprocess.Popen(_worker_cmd(args.concurrency))]
    print(f"Tuneforge is up at http://{args.host}:{args.port} (docs at /docs). Ctrl-C stops it.", flush=True)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return max((p.returncode or 0) for p in procs) if any(p.returncode for p in procs) else 0


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


def _register(args: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.core.errors import TuneforgeError
    from app.domains.models import service as models

    try:
        with session_scope() as session:
            row = models.register(session, name=args.name, path=args.path, replace=args.replace)
    except TuneforgeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"base model {row.id} registered ({row.architecture}, {row.path})")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from worker.training.tiny import make_tiny_model

    path = make_tiny_model(args.path, pretrain_steps=args.pretrain_steps)
    print(f"tiny Llama model and tokenizer written to {path}")
    return 0


def _list_models(_: argparse.Namespace) -> int:
    from app.core.db import session_scope
    from app.domains.models import service as models

    with session_scope() as session:
        for m in models.list_base(session):
            print(f"{m.id}\t{m.architecture}\t{m.path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tuneforge.demo import run_demo

    return run_demo(data_dir=Path(args.data_dir), port=args.port, pretrain_steps=args.pretrain_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tuning as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="API and one worker together")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(func=_up)

    p = sub.add_parser("serve", help="the API process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="a Celery worker (training and evaluation queues by default)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--queues", default=None,
                   help="comma-separated; e.g. 'training' on GPU machines, 'evaluation' on CPU machines")
    p.set_defaults(func=_worker)

    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(func=_migrate)

    admin = sub.add_parser("admin", help="operator commands").add_subparsers(dest="admin", required=True)
    p = admin.add_parser("create-team", help="create a team and print its API key once")
    p.add_argument("name")
    p.set_defaults(func=_create_team)

    mdl = sub.add_parser("models", help="base models").add_subparsers(dest="models", required=True)
    p = mdl.add_parser("register", help="register a local model directory")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--replace", action="store_true")
    p.set_defaults(func=_register)
    p = mdl.add_parser("make-tiny", help="build the tiny test model offline")
    p.add_argument("path")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="train the random model this many steps on Python's sources first (about 0.2 s each)")
    p.set_defaults(func=_make_tiny)
    mdl.add_parser("list", help="list base models").set_defaults(func=_list_models)

    p = sub.add_parser("demo", help="run the whole path end to end on a fresh embedded instance")
    p.add_argument("--data-dir", default=".tuneforge-demo")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--pretrain-steps", type=int, default=150,
                   help="pretraining steps for the tiny model, so its output looks like Python (0: random weights)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
