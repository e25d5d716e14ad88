"""API under load: throughput at a latency bound, and one team's flood against another team's reads.

Runs `tuneforge serve` twice, on Postgres (with Redis as the broker) and on the embedded default
(SQLite, filesystem broker), each on a fresh database with the tiny model registered and no worker
(jobs stay queued). The load generator is httpx's async client in this process, over real HTTP.

1. Throughput: closed loops of 1, 2, 4 and 8 concurrent clients on one key (the team's rate limit
   raised out of the way, the in-flight limits at their defaults) send `POST /v1/fine_tuning/jobs`,
   then `GET /v1/fine_tuning/jobs`, for --seconds each; reported: the most requests/s of a level
   whose p99 stays under 50 ms (and every level's numbers).
2. Fairness: with every limit at its default, team A floods with 500 concurrent clients (alternating
   job creates and lists, each client sending again as soon as it is answered) and 20 slow uploads
   (one byte every --trickle seconds) for --flood-seconds, while team B lists its jobs, one request
   at a time. Reported: team B's p50/p99 and its 5xx count; team A's 2xx, 429 and 503 counts.

    .venv/bin/python bench/api_load.py [--seconds 4] [--flood-seconds 15] [--modes postgres,embedded]

Prints a table and writes bench/results/api_load-<host>.json. The client shares the machine's cores
with the server, so the numbers are a lower bound of what the server alone would do.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, write_report  # noqa: E402
from tuneforge import processes  # noqa: E402

P99_BOUND_MS = 50.0
LEVELS = (1, 2, 4, 8)
FLOOD_CLIENTS = 500
SLOW_UPLOADS = 20
B_PER_SECOND = 20  # team B polls like a client within its default rate limit (50/s)
DATASET = b"".join(b'{"messages": [{"role": "user", "content": "Say %d."}, {"role": "assistant", "content": "%d"}]}\n'
                   % (i, i) for i in range(20))


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"tuneforge {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _team(env: dict[str, str], name: str) -> str:
    match = re.search(r"^(tf_\S+)$", _cli(env, "admin", "create-team", name), re.MULTILINE)
    if match is None:
        raise RuntimeError("create-team printed no key")
    return match.group(1)


class Server:
    """`tuneforge serve` on a fresh database of its own, with tiny-llama and three teams."""

    def __init__(self, mode: str, args: argparse.Namespace, model: Path, work: Path) -> None:
        self.mode, self.pg_db = mode, None
        run = secrets.token_hex(3)
        data = work / mode
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
        env.update({"TUNEFORGE_DATA_DIR": str(data), "TUNEFORGE_TRAINING_QUEUE": f"bench-training-{run}",
                    "TUNEFORGE_EVALUATION_QUEUE": f"bench-evaluation-{run}", "HF_HUB_OFFLINE": "1"})
        if mode == "postgres":
            import psycopg

            self.pg_db = f"tuneforge_bench_{run}"
            with psycopg.connect(args.pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_db}"')
            base = args.pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            env.update({"TUNEFORGE_DATABASE_URL": f"{base}/{self.pg_db}", "TUNEFORGE_BROKER_URL": args.redis})
        self.args, self.env = args, env
        _cli(env, "migrate")
        _cli(env, "models", "register", "tiny-llama", str(model))
        self.keys = {name: _team(env, f"bench-{name}-{run}") for name in ("throughput", "a", "b")}
        # The throughput team measures the server, not the limits: its rate limit and queue are raised.
        _cli(env, "admin", "set-quota", f"bench-throughput-{run}", "--rate-per-second", "1000000",
             "--rate-burst", "1000000", "--queued-jobs", "1000000")
        for name in ("a", "b"):
            _cli(env, "admin", "set-quota", f"bench-{name}-{run}", "--queued-jobs", "1000000")
        self.port = processes.free_port()
        self.log = open(work / f"api-{mode}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", "--port", str(self.port)],
                                     env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {self.log.name}")
            time.sleep(0.2)
        self.files = {name: self._upload(key) for name, key in self.keys.items()}

    def _upload(self, key: str) -> str:
        r = httpx.post(f"{self.base}/v1/files", headers={"Authorization": f"Bearer {key}"},
                       data={"purpose": "fine-tune"}, files={"file": ("data.jsonl", DATASET)}, timeout=30)
        r.raise_for_status()
        return r.json()["id"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        if self.pg_db:
            import psycopg

            with psycopg.connect(self.args.pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')


def _client(server: Server, team: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{server.base}/v1", headers={"Authorization": f"Bearer {server.keys[team]}"},
                             timeout=120, limits=httpx.Limits(max_connections=connections,
                                                              max_keepalive_connections=connections))


def _job(server: Server, team: str) -> dict:
    return {"model": "tiny-llama", "training_file": server.files[team]}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _closed_loop(server: Server, op: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with _client(server, "throughput", clients) as client:
        async def one() -> None:
            if op == "create":
                await client.post("/fine_tuning/jobs", json=_job(server, "throughput"))
            else:
                await client.get("/fine_tuning/jobs", params={"limit": 20})

        await asyncio.gather(*(one() for _ in range(clients)))  # warm the connections
        end = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                start = time.perf_counter()
                if op == "create":
                    r = await client.post("/fine_tuning/jobs", json=_job(server, "throughput"))
                else:
                    r = await client.get("/fine_tuning/jobs", params={"limit": 20})
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(clients)))
        wall = time.monotonic() - began
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    return {"clients": clients, "requests_per_s": round(ok / wall, 1), "p50_ms": _round(_quantile(latencies, 0.5)),
            "p99_ms": _round(_quantile(latencies, 0.99)), "statuses": statuses}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _flood(server: Server, seconds: float, trickle: float) -> dict:
    a_statuses: dict[int | str, int] = {}
    end = time.monotonic() + seconds

    async def flood_loop(client: httpx.AsyncClient, n: int) -> None:
        while time.monotonic() < end:
            status: int | str
            try:
                if n % 2:
                    r = await client.post("/fine_tuning/jobs", json=_job(server, "a"))
                else:
                    r = await client.get("/fine_tuning/jobs")
                status = r.status_code
            except httpx.HTTPError as exc:  # no answer at all
                status = type(exc).__name__
            a_statuses[status] = a_statuses.get(status, 0) + 1

    async def slow_upload(client: httpx.AsyncClient) -> None:
        boundary = "benchboundary"

        async def body():
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                   f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n"
                   "Content-Type: application/jsonl\r\n\r\n").encode()
            while time.monotonic() < end:
                await asyncio.sleep(trickle)
                yield b" "
            yield f"\r\n--{boundary}--\r\n".encode()

        status: int | str
        try:
            r = await client.post("/files", content=body(),
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            status = r.status_code
        except httpx.HTTPError as exc:  # refused before its body was sent, or cut
            status = "upload " + type(exc).__name__
        a_statuses[status] = a_statuses.get(status, 0) + 1

    # Team B's client runs in a process of its own, so its timings are the server's, not those of
    # this process's event loop, busy with the flood's 500 clients.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        team_b = asyncio.get_running_loop().run_in_executor(
            pool, _team_b, server.base, server.keys["b"], 1.0, seconds - 1.0)
        async with _client(server, "a", FLOOD_CLIENTS + SLOW_UPLOADS) as a:
            await asyncio.gather(*(flood_loop(a, n) for n in range(FLOOD_CLIENTS)),
                                 *(slow_upload(a) for _ in range(SLOW_UPLOADS)))
        b_latencies, b_statuses = await team_b
    return {
        "team_b": {"requests": len(b_latencies), "p50_ms": _round(_quantile(b_latencies, 0.5)),
                   "p99_ms": _round(_quantile(b_latencies, 0.99)),
                   "max_ms": _round(max(b_latencies)) if b_latencies else None,
                   "5xx": sum(n for s, n in b_statuses.items() if s >= 500),
                   "non_2xx": sum(n for s, n in b_statuses.items() if not 200 <= s < 300), "statuses": b_statuses},
        "team_a": {"requests": sum(a_statuses.values()),
                   "2xx": sum(n for s, n in a_statuses.items() if isinstance(s, int) and 200 <= s < 300),
                   "429": a_statuses.get(429, 0), "503": a_statuses.get(503, 0),
                   "5xx": sum(n for s, n in a_statuses.items() if isinstance(s, int) and s >= 500),
                   "no_answer": sum(n for s, n in a_statuses.items() if isinstance(s, str)),
                   "statuses": a_statuses},
    }


def _team_b(base: str, key: str, delay: float, seconds: float) -> tuple[list[float], dict[int, int]]:
    """Team B's reads, one at a time and at most B_PER_SECOND (within its rate limit), from `delay` s on
    for `seconds`: (latencies in ms, statuses)."""
    async def run() -> tuple[list[float], dict[int, int]]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        await asyncio.sleep(delay)  # let the flood build up first
        end = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"},
                                     timeout=120) as client:
            while (now := time.monotonic()) < end:
                start = time.perf_counter()
                r = await client.get("/fine_tuning/jobs")
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                await asyncio.sleep(max(0.0, now + 1 / B_PER_SECOND - time.monotonic()))
        return latencies, statuses

    return asyncio.run(run())


def _best(levels: list[dict]) -> dict | None:
    within = [lv for lv in levels if lv["p99_ms"] is not None and lv["p99_ms"] < P99_BOUND_MS]
    return max(within, key=lambda lv: lv["requests_per_s"]) if within else None


async def _measure(server: Server, args: argparse.Namespace) -> dict:
    out: dict = {}
    for op in ("create", "list"):
        levels = [await _closed_loop(server, op, clients, args.seconds) for clients in LEVELS]
        best = _best(levels)
        out[op] = {"levels": levels, "best_within_p99_bound": best}
    out["flood"] = await _flood(server, args.flood_seconds, args.trickle)
    return out


def _best_cell(op: dict) -> str:
    b = op["best_within_p99_bound"]
    return f"{b['requests_per_s']:.0f} (c={b['clients']})" if b else "none"


def _table(results: dict) -> str:
    lines = [f"{'mode':<9} {'create/s@p99<50ms':>18} {'list/s@p99<50ms':>16} {'B p50 ms':>9} {'B p99 ms':>9} "
             f"{'B 5xx':>6} {'A 2xx':>6} {'A 429':>6} {'A 503':>6}"]
    for mode, r in results.items():
        f = r["flood"]
        lines.append(f"{mode:<9} {_best_cell(r['create']):>18} {_best_cell(r['list']):>16} "
                     f"{f['team_b']['p50_ms']!s:>9} {f['team_b']['p99_ms']!s:>9} {f['team_b']['5xx']:>6} "
                     f"{f['team_a']['2xx']:>6} {f['team_a']['429']:>6} {f['team_a']['503']:>6}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="postgres,embedded")
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput level")
    parser.add_argument("--flood-seconds", type=float, default=15.0)
    parser.add_argument("--trickle", type=float, default=3.0, help="seconds between a slow upload's bytes")
    parser.add_argument("--pg-admin", default=os.environ.get("TUNEFORGE_TEST_PG",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis", default=os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    results: dict = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tuneforge-api-load-") as tmp:
        work = Path(tmp)
        model = work / "tiny-llama"
        _cli(dict(os.environ), "models", "make-tiny", str(model))
        for mode in args.modes.split(","):
            server = Server(mode, args, model, work)
            try:
                results[mode] = asyncio.run(_measure(server, args))
            finally:
                server.close()
            print(f"{mode}: done", flush=True)
    table = _table(results)
    print(table)
    report = {"machine": describe(), "settings": {"seconds": args.seconds, "flood_seconds": args.flood_seconds,
                                                  "trickle_s": args.trickle, "levels": LEVELS,
                                                  "flood_clients": FLOOD_CLIENTS, "slow_uploads": SLOW_UPLOADS,
                                                  "p99_bound_ms": P99_BOUND_MS},
              "wall_s": round(time.monotonic() - began, 1), "results": results, "table": table}
    print(f"wrote {write_report(f'api_load-{socket.gethostname()}', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
