"""Upload and download throughput, and the API's peak memory, for one large file on each storage backend.

For each backend it starts `uvicorn app.main:create_app` on the embedded default (SQLite, filesystem
broker) in a fresh data dir, with the upload limit raised past the file:
- local: blobs in <data_dir>/storage;
- s3: blobs in a bucket of moto's standalone S3 server (`moto[server]`, a subprocess on a free port,
  holding objects in its own memory), through boto3's multipart transfers.

It sends one JSONL file of --mib MiB (plain text records, generated once) as `POST /v1/files`
(multipart/form-data, streamed by httpx), or with --via uploads through OpenAI's Uploads API, as the
official client's uploads.upload_file_chunked sends it (parts of --part-mib MiB one after another,
completed with the file's md5, computed before the clock starts), then reads it back through
`GET /v1/files/{id}/content`.
Reported per backend: upload and download MiB/s (wall time of the request, validation included),
and the API process's peak RSS (VmHWM) before the upload and after both transfers; then the ratio
of S3 to local. The client, the API and the S3 server share the machine's cores.

    .venv/bin/python bench/storage_throughput.py [--mib 1024] [--backends local,s3] [--purpose fine-tune]
        [--via files|uploads] [--part-mib 64]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 1024**2

from bench.s3 import bucket_env, moto_server  # noqa: E402
from tuneforge import processes  # noqa: E402


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def make_file(path: Path, mib: int) -> None:
    """Plain-text JSONL records of about 1 KiB each, up to mib MiB (whole lines)."""
    line = (json.dumps({"text": "def f(x):\n    return x * 2\n" * 36}) + "\n").encode()
    target = mib * MIB
    with open(path, "wb") as f:
        block = line * (MIB // len(line))
        written = 0
        while written + len(block) <= target:
            f.write(block)
            written += len(block)
        while written + len(line) <= target:
            f.write(line)
            written += len(line)


def upload_in_parts(base_url: str, key: str, data: Path, purpose: str, part_bytes: int, md5: str) -> str:
    """data sent through /v1/uploads by the official client's upload_file_chunked (parts of part_bytes,
    one after another, completed with md5); the completed File's id."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=3600)
    upload = client.uploads.upload_file_chunked(file=data, mime_type="application/jsonl", purpose=purpose,
                                                part_size=part_bytes, md5=md5)
    assert upload.file is not None, upload
    return upload.file.id


def run_backend(backend: str, data: Path, purpose: str, s3_endpoint: str | None, via: str = "files",
                part_bytes: int = 64 * MIB) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"tf-storage-{backend}-"))
    env = {**os.environ, "TUNEFORGE_DATA_DIR": str(work / "data"), "TUNEFORGE_UPLOAD_MAX_BYTES": str(16 * 1024 * MIB),
           "TUNEFORGE_UPLOAD_MAX_LINE_BYTES": str(MIB)}
    for name in ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_BROKER_URL", "TUNEFORGE_STORAGE_URL"):
        env.pop(name, None)
    if backend == "s3":
        assert s3_endpoint is not None
        env |= bucket_env(s3_endpoint)
    made = subprocess.run([sys.executable, "-m", "tuneforge.cli", "admin", "create-team", f"bench-{backend}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    key = made.stdout.split()[-1]
    port = processes.free_port()
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
                            "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        processes.wait_http(f"{base}/readyz", api)
        client = httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=3600)
        with data.open("rb") as f:  # one small upload first: imports, pools and clients warm
            head = f.read(4096).rsplit(b"\n", 1)[0] + b"\n"
        client.post("/files", data={"purpose": purpose}, files={"file": ("warm.jsonl", head)}).raise_for_status()
        before = _vm_hwm_mib(api.pid)
        size = data.stat().st_size
        md5 = _md5(data) if via == "uploads" else ""
        start = time.perf_counter()
        if via == "uploads":
            file_id = upload_in_parts(f"{base}/v1", key, data, purpose, part_bytes, md5)
        else:
            with data.open("rb") as f:
                response = client.post("/files", data={"purpose": purpose}, files={"file": ("big.jsonl", f)})
            response.raise_for_status()
            file_id = response.json()["id"]
        upload_s = time.perf_counter() - start
        start = time.perf_counter()
        received = 0
        with client.stream("GET", f"/files/{file_id}/content") as stream:
            stream.raise_for_status()
            for chunk in stream.iter_bytes(MIB):
                received += len(chunk)
        download_s = time.perf_counter() - start
        assert received == size, (received, size)
        return {"backend": backend, "via": via, "bytes": size, "upload_s": upload_s,
                "upload_mib_s": size / MIB / upload_s,
                "download_s": download_s, "download_mib_s": size / MIB / download_s,
                "rss_before_mib": before, "rss_peak_mib": _vm_hwm_mib(api.pid)}
    finally:
        api.terminate()
        api.wait(30)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--purpose", default="fine-tune", choices=["fine-tune", "user_data"])
    parser.add_argument("--via", default="files", choices=["files", "uploads"],
                        help="POST /v1/files, or OpenAI's Uploads API in parts")
    parser.add_argument("--part-mib", type=int, default=64, help="part size with --via uploads")
    args = parser.parse_args()
    backends = args.backends.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="tf-storage-bench-"))
    try:
        data = scratch / "big.jsonl"
        make_file(data, args.mib)
        with moto_server() if "s3" in backends else contextlib.nullcontext() as endpoint:
            results = {b: run_backend(b, data, args.purpose, endpoint, args.via, args.part_mib * MIB)
                       for b in backends}
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    route = "/v1/uploads" if args.via == "uploads" else "/v1/files"
    print(f"{args.mib} MiB file, purpose {args.purpose}, through {route}")
    print(f"{'backend':8} {'upload MiB/s':>13} {'download MiB/s':>15} {'API RSS before':>15} {'API RSS peak':>13}")
    for r in results.values():
        print(f"{r['backend']:8} {r['upload_mib_s']:13.1f} {r['download_mib_s']:15.1f} "
              f"{r['rss_before_mib']:12.0f} MiB {r['rss_peak_mib']:9.0f} MiB")
    if {"local", "s3"} <= results.keys():
        local, s3 = results["local"], results["s3"]
        print(f"s3 / local: upload {s3['upload_mib_s'] / local['upload_mib_s']:.2f}, "
              f"download {s3['download_mib_s'] / local['download_mib_s']:.2f}, "
              f"peak RSS {s3['rss_peak_mib'] / local['rss_peak_mib']:.2f}")
    print(json.dumps(list(results.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
