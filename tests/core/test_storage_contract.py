"""The Storage contract, held by both backends alike: the local directory and an S3-compatible
bucket (moto's standalone server, a real S3-protocol endpoint in a process of its own)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.exceptions import ClientError
import httpx
import pytest

from app.core.config import Settings
from app.core.s3 import S3Storage
from app.core.storage import LocalStorage, Storage, StorageKeyError
from tests.conftest import ROOT, s3_storage_env

PART = 5 * 1024**2  # S3's smallest multipart part
KEY = "teams/team-a/files/data.jsonl"


def _s3_settings(s3_server: str, data_dir: Path, **storage: int | bool) -> Settings:
    env = s3_storage_env(s3_server, f"contract-{secrets.token_hex(4)}", prefix="deploy/blobs")
    return Settings(data_dir=data_dir, storage_url=env["TUNEFORGE_STORAGE_URL"], s3={
        "endpoint_url": s3_server, "region": "us-east-1", "access_key_id": env["TUNEFORGE_S3__ACCESS_KEY_ID"],
        "secret_access_key": env["TUNEFORGE_S3__SECRET_ACCESS_KEY"], "addressing_style": "path"},
        storage={"part_bytes": PART, "transfer_threads": 2, **storage})


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> str:
    return request.param


@pytest.fixture
def storage(backend, request, tmp_path) -> Storage:
    if backend == "local":
        return LocalStorage(tmp_path / "storage")
    return S3Storage.from_settings(_s3_settings(request.getfixturevalue("s3_server"), tmp_path / "data"))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _leftovers(storage: Storage) -> list[str]:
    """Every blob the backend holds, temporaries included: what a refused write must not leave."""
    if isinstance(storage, LocalStorage):
        return sorted(str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file())
    assert isinstance(storage, S3Storage)
    spooled = [p.name for p in storage.spool_dir.iterdir()]
    return sorted(storage._list("")) + spooled


def test_put_file_stores_bytes_that_open_iter_size_and_exists_read_back(storage, tmp_path):
    data = b'{"text": "a"}\n' * 1000
    blob = storage.put_file(_write(tmp_path / "src.jsonl", data), KEY)
    assert (blob.key, blob.bytes, blob.sha256) == (KEY, len(data), hashlib.sha256(data).hexdigest())
    with storage.open(KEY) as f:
        assert f.read() == data
    assert b"".join(storage.iter_bytes(KEY, chunk=4096)) == data
    assert storage.size(KEY) == len(data)
    assert storage.exists(KEY)
    assert not storage.exists("teams/team-a/files/other.jsonl")


def test_a_committed_temp_file_becomes_the_blob_and_the_temporary_is_gone(storage):
    with storage.temp_file() as tmp:
        tmp.write(b"streamed bytes")
    storage.commit(tmp.name, KEY)
    assert b"".join(storage.iter_bytes(KEY)) == b"streamed bytes"
    assert not Path(tmp.name).exists()


def test_an_open_reader_reports_its_size_by_seeking_to_the_end_and_reads_from_any_offset(storage, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    storage.put_file(_write(tmp_path / "src", data), KEY)
    with storage.open(KEY) as f:
        assert f.seek(0, os.SEEK_END) == len(data)
        f.seek(0)
        assert f.read(1000) == data[:1000]
        f.seek(2 * 1024 * 1024)
        assert f.read() == data[2 * 1024 * 1024:]


def test_delete_removes_a_blob_and_a_prefix_of_blobs_and_a_missing_key_is_no_error(storage, tmp_path):
    storage.put_file(_write(tmp_path / "one", b"1"), KEY)
    src = tmp_path / "tree"
    for name in ("adapter_config.json", "adapter_model.safetensors", "sub/tokenizer.json"):
        _write(src / name, name.encode())
    prefix = "teams/team-a/adapters/ftadapter-1/files"
    storage.put_tree(src, prefix)
    assert storage.exists(prefix)
    storage.delete(KEY)
    storage.delete("teams/team-a/adapters/ftadapter-1")
    assert not storage.exists(KEY)
    assert not storage.exists(prefix)
    assert not storage.exists(f"{prefix}/sub/tokenizer.json")
    storage.delete(KEY)  # again: already gone
    assert _leftovers(storage) == []


def test_fetch_to_stages_a_blob_whole_into_a_local_file(storage, tmp_path):
    data = os.urandom(2 * PART + 123)  # a multipart object on S3
    storage.put_file(_write(tmp_path / "src", data), KEY)
    dest = storage.fetch_to(KEY, tmp_path / "cache" / "deep" / "train.jsonl")
    assert dest == tmp_path / "cache" / "deep" / "train.jsonl"
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["train.jsonl"]  # no partial left behind


def test_fetch_tree_to_stages_every_blob_under_a_prefix_and_replaces_the_destination(storage, tmp_path):
    src = tmp_path / "ckpt"
    files = {"model.safetensors": os.urandom(1000), "state/optimizer.pt": b"opt", "trainer_state.json": b"{}"}
    for name, data in files.items():
        _write(src / name, data)
    prefix = "teams/team-a/checkpoints/ftjob-1/step-00000008"
    assert storage.put_tree(src, prefix) == sorted(f"{prefix}/{n}" for n in files)
    dest = tmp_path / "stage" / "step-00000008"
    _write(dest / "stale.txt", b"from an earlier fetch")
    storage.fetch_tree_to(prefix, dest)
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert sorted(p.name for p in dest.parent.iterdir()) == ["step-00000008"]


def test_fetches_of_one_prefix_at_once_each_get_a_whole_tree_and_leave_one(storage, tmp_path):
    # Two pool processes staging one base model: neither may write into, or delete, the other's copy.
    src = tmp_path / "model"
    files = {f"shard-{i:03d}.bin": os.urandom(20_000) for i in range(60)}
    for name, data in files.items():
        _write(src / name, data)
    prefix = "models/tiny/rev-1"
    storage.put_tree(src, prefix)
    dest, file_dest = tmp_path / "cache" / "rev-1", tmp_path / "cache" / "one.bin"

    def fetch(_: int) -> Path:
        storage.fetch_to(f"{prefix}/shard-000.bin", file_dest)
        return storage.fetch_tree_to(prefix, dest)

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(fetch, range(12))) == [dest] * 12
    assert file_dest.read_bytes() == files["shard-000.bin"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert sorted(p.name for p in dest.parent.iterdir()) == ["one.bin", "rev-1"]  # no partial left


def test_a_large_file_is_stored_multipart_as_a_byte_identical_object(storage, backend, tmp_path):
    data = os.urandom(3 * PART + 1)
    blob = storage.put_file(_write(tmp_path / "big", data), KEY)
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(b"".join(storage.iter_bytes(KEY))).hexdigest() == blob.sha256
    if backend == "s3":
        assert isinstance(storage, S3Storage)
        head = storage._client().head_object(Bucket=storage.bucket, Key=storage.name(KEY))
        # A multipart object's ETag is the md5 of its parts' md5s, suffixed with the number of parts.
        assert head["ETag"].strip('"').endswith("-4")
        assert head["ContentLength"] == len(data)


_RSS_PROBE = textwrap.dedent("""
    import hashlib, json, os, resource, sys
    from pathlib import Path
    from app.core.config import Settings
    from app.core.storage import LocalStorage
    from app.core.s3 import S3Storage

    settings = json.loads(sys.argv[1])
    work = Path(settings.pop("work"))
    storage = (S3Storage.from_settings(Settings(**settings)) if settings.get("storage_url")
               else LocalStorage(work / "storage"))
    small = work / "small"
    small.write_bytes(b"x" * 1024)
    storage.put_file(small, "teams/t/files/small")  # clients, pools and imports warm
    storage.fetch_to("teams/t/files/small", work / "small.out")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = work / "big"
    with open(big, "wb") as f:
        for _ in range(int(sys.argv[2])):
            f.write(os.urandom(1 << 20))
    blob = storage.put_file(big, "teams/t/files/big")
    streamed = hashlib.sha256()
    for chunk in storage.iter_bytes("teams/t/files/big"):
        streamed.update(chunk)
    staged = storage.fetch_to("teams/t/files/big", work / "big.out")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    digest = hashlib.sha256()
    with open(staged, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    print(json.dumps({"base_kib": base, "peak_kib": peak, "stored": blob.sha256, "streamed": streamed.hexdigest(),
                      "staged": digest.hexdigest()}))
    """)


def test_storing_streaming_and_staging_a_large_file_keep_memory_flat(backend, request, tmp_path):
    """A 160 MiB blob put, streamed and fetched in a fresh process: its peak RSS grows by a few
    parts at most, nowhere near the blob's size."""
    mib = 160
    settings: dict = {"work": str(tmp_path)}
    if backend == "s3":
        s3 = _s3_settings(request.getfixturevalue("s3_server"), tmp_path / "data")
        settings |= {"data_dir": str(tmp_path / "data"), "storage_url": s3.storage_url,
                     "s3": {**s3.s3.model_dump(), "secret_access_key": s3.s3.secret_access_key.get_secret_value()},
                     "storage": s3.storage.model_dump()}
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(settings), str(mib)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stored"] == result["streamed"] == result["staged"]
    assert (tmp_path / "big.out").stat().st_size == mib * 1024**2
    grown_mib = (result["peak_kib"] - result["base_kib"]) / 1024
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.0f} MiB for a {mib} MiB blob"


@pytest.mark.parametrize("key", [
    "teams/team-a/../team-b/files/data.jsonl", "../outside", "/teams/team-a/x", "teams//team-a/x",
    "teams/team-a/x/", "teams\\team-a\\x", "teams/team-a/x\0", "",
], ids=["into-other-team", "parent", "absolute", "empty-part", "trailing-slash", "backslash", "nul", "empty"])
def test_a_key_outside_its_prefix_is_refused_by_every_operation_and_writes_nothing(storage, tmp_path, key):
    src = _write(tmp_path / "src", b"x")
    for operation in (lambda: storage.put_file(src, key), lambda: storage.open(key), lambda: storage.size(key),
                      lambda: storage.exists(key), lambda: storage.delete(key),
                      lambda: storage.fetch_to(key, tmp_path / "out"), lambda: storage.put_tree(src.parent, key),
                      lambda: storage.fetch_tree_to(key, tmp_path / "tree"), lambda: storage.download_url(key)):
        with pytest.raises(StorageKeyError):
            operation()
    assert _leftovers(storage) == []
    assert not (tmp_path / "out").exists()


def test_a_missing_key_raises_file_not_found_and_stages_nothing(storage, tmp_path):
    missing = "teams/team-a/files/missing.jsonl"
    with pytest.raises(FileNotFoundError):
        storage.open(missing)
    with pytest.raises(FileNotFoundError):
        storage.size(missing)
    with pytest.raises(FileNotFoundError):
        storage.fetch_to(missing, tmp_path / "stage" / "x.jsonl")
    with pytest.raises(FileNotFoundError):
        storage.fetch_tree_to("teams/team-a/adapters/none", tmp_path / "stage" / "tree")
    assert not storage.exists(missing)
    assert not [p for p in (tmp_path / "stage").rglob("*") if p.is_file()]


def test_download_url_presigns_a_short_lived_get_on_s3_and_is_none_locally(storage, backend, tmp_path):
    storage.put_file(_write(tmp_path / "src", b"adapter bytes"), KEY)
    url = storage.download_url(KEY, filename="ftadapter-1.tar.gz")
    if backend == "local":
        assert url is None
        return
    assert url is not None and "X-Amz-Expires=300" in url and "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"adapter bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="ftadapter-1.tar.gz"'
    tampered = url.replace("files/data.jsonl", "files/other.jsonl")
    assert httpx.get(tampered).status_code == 403


def test_s3_keys_live_under_the_configured_prefix_of_the_bucket(s3_server, tmp_path):
    storage = S3Storage.from_settings(_s3_settings(s3_server, tmp_path / "data"))
    storage.put_file(_write(tmp_path / "src", b"x"), KEY)
    assert list(storage._list("")) == [f"deploy/blobs/{KEY}"]


def test_s3_fetch_tree_refuses_an_object_name_that_would_escape_the_destination(s3_server, tmp_path):
    settings = _s3_settings(s3_server, tmp_path / "data")
    storage = S3Storage.from_settings(settings)
    prefix = "teams/team-a/adapters/ftadapter-1/files"
    raw = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="y")
    raw.put_object(Bucket=storage.bucket, Key=f"{storage.name(prefix)}/a/../../../escaped", Body=b"x")
    with pytest.raises(StorageKeyError):
        storage.fetch_tree_to(prefix, tmp_path / "stage" / "tree")
    assert not (tmp_path / "stage" / "tree").exists()
    assert not list((tmp_path).rglob("escaped"))


def test_check_passes_on_a_working_backend_and_leaves_nothing(storage):
    storage.check()
    assert _leftovers(storage) == []


def test_check_fails_when_the_bucket_is_missing(s3_server, tmp_path):
    settings = _s3_settings(s3_server, tmp_path / "data")
    other = settings.model_copy(update={"storage_url": "s3://no-such-bucket-here/x"})
    with pytest.raises(ClientError):
        S3Storage.from_settings(other).check()
