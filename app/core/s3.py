"""Blob storage in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...), through boto3.

A key `k` of the Storage interface is the object `<prefix>/k` of the bucket; keys pass the same
check_key as on the local backend, so a team's keys stay under teams/<team_id>/ (S3 has no
symlinks: the lexical check is the whole confinement). A "directory" (an adapter's files, a
checkpoint) is every object under `<key>/`.

Memory stays flat whatever a blob's size: uploads and downloads are boto3 managed transfers, in
multipart parts of `storage.part_bytes` with `storage.transfer_threads` in flight, read from and
written to local files; open() streams the object's body. A write stages its bytes in a local
spool file first (temp_file, in <data_dir>/tmp) and commit() uploads it as one object, which S3
makes visible only once the upload completes: a reader never sees half a blob.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from app.core.blob_keys import StoredBlob, check_key, partial_path, replace_tree, tree_keys

if TYPE_CHECKING:
    from app.core.config import Settings

_MISSING = {"404", "NoSuchKey", "NotFound"}


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


class S3Storage:
    def __init__(self, *, bucket: str, prefix: str, spool_dir: Path, client_options: dict[str, Any],
                 public_endpoint_url: str | None = None, part_bytes: int = 16 * 1024**2,
                 transfer_threads: int = 4, presign_seconds: int = 300) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.spool_dir = spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._options = client_options
        self._public_endpoint_url = public_endpoint_url
        self.presign_seconds = presign_seconds
        self.transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes,
                                       max_concurrency=transfer_threads, use_threads=transfer_threads > 1)
        # A stream without a size is read into memory a part at a time: bound how many parts wait.
        self.transfer.max_in_memory_upload_chunks = transfer_threads
        self._clients: dict[tuple[int, bool], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        location = settings.s3_location
        assert location is not None
        s3 = settings.s3
        options: dict[str, Any] = {
            "endpoint_url": s3.endpoint_url, "region_name": s3.region, "aws_access_key_id": s3.access_key_id,
            "aws_secret_access_key": s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
            "config": Config(
                signature_version="s3v4", s3={"addressing_style": s3.addressing_style},
                retries={"mode": "standard", "max_attempts": 5},
                # Checksums only where S3 requires them: several S3-compatible stores refuse the
                # trailing CRC checksums boto3 adds by default.
                request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        }
        options = {k: v for k, v in options.items() if v is not None}
        return cls(bucket=location[0], prefix=location[1], spool_dir=settings.data_dir / "tmp",
                   client_options=options, public_endpoint_url=s3.public_endpoint_url,
                   part_bytes=settings.storage.part_bytes, transfer_threads=settings.storage.transfer_threads,
                   presign_seconds=settings.storage.presign_seconds)

    def _client(self, public: bool = False) -> Any:
        """One client per process (boto3 clients are thread-safe, but a pool inherited across a fork
        would share sockets with the parent: Celery's prefork children get their own)."""
        slot = (os.getpid(), public)
        client = self._clients.get(slot)
        if client is None:
            with self._lock:
                client = self._clients.get(slot)
                if client is None:
                    options = dict(self._options)
                    if public and self._public_endpoint_url:
                        options["endpoint_url"] = self._public_endpoint_url
                    client = boto3.session.Session().client("s3", **options)
                    self._clients[slot] = client
        return client

    def name(self, key: str) -> str:
        """The object name of a key; raises StorageKeyError for a key check_key refuses."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- the Storage interface ----------------------------------------------------------------

    def check(self) -> None:
        """Raises unless the bucket answers with these credentials (the readiness probe)."""
        self._client().head_bucket(Bucket=self.bucket)
        with self.temp_file() as tmp:  # and the spool has room
            tmp.write(b"ok")
        os.unlink(tmp.name)

    def download_url(self, key: str, *, filename: str | None = None) -> str | None:
        """A presigned GET of the object, valid for presign_seconds, at the public endpoint."""
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self.name(key)}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self._client(public=True).generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.presign_seconds)
        return url

    def temp_file(self) -> tempfile._TemporaryFileWrapper:
        """A local spool file for commit(), which uploads it and removes it."""
        return tempfile.NamedTemporaryFile(dir=self.spool_dir, delete=False)

    def commit(self, temp_path: str | Path, key: str) -> None:
        """Upload the spool file as the object of key (multipart past part_bytes), then remove it,
        whether or not the upload succeeded."""
        try:
            self._client().upload_file(str(temp_path), self.bucket, self.name(key), Config=self.transfer)
        finally:
            Path(temp_path).unlink(missing_ok=True)

    def put_file(self, src: Path, key: str) -> StoredBlob:
        name = self.name(key)
        digest, size = hashlib.sha256(), 0
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        self._client().upload_file(str(src), self.bucket, name, Config=self.transfer)
        return StoredBlob(key=key, bytes=size, sha256=digest.hexdigest())

    def put_tree(self, src: Path, prefix: str) -> list[str]:
        files = tree_keys(src, prefix)
        for file, key in files:
            self.put_file(file, key)
        return [key for _, key in files]

    def open(self, key: str) -> BinaryIO:
        """A reader of the object as it is now (its ETag pinned: a seek that reopens it fails if the
        object was replaced). Raises FileNotFoundError when there is none."""
        name = self.name(key)
        try:
            response = self._client().get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no blob at storage key {key!r}") from None
            raise
        return cast(BinaryIO, _ObjectReader(self._client(), self.bucket, name, response))

    def iter_bytes(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as f:
            yield from iter(lambda: f.read(chunk), b"")

    def exists(self, key: str) -> bool:
        """True for a blob, and for a prefix holding blobs (as a directory exists locally)."""
        name = self.name(key)
        try:
            self._client().head_object(Bucket=self.bucket, Key=name)
            return True
        except ClientError as exc:
            if not _missing(exc):
                raise
        listed = self._client().list_objects_v2(Bucket=self.bucket, Prefix=f"{name}/", MaxKeys=1)
        return bool(listed.get("KeyCount"))

    def size(self, key: str) -> int:
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=self.name(key))
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no blob at storage key {key!r}") from None
            raise
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        """Remove the blob at key and every blob under key/; nothing there is not an error."""
        name = self.name(key)
        client = self._client()
        client.delete_object(Bucket=self.bucket, Key=name)
        batch: list[dict[str, str]] = []
        for name_under in self._list(f"{name}/"):
            batch.append({"Key": name_under})
            if len(batch) == 1000:  # S3's limit per DeleteObjects
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                batch = []
        if batch:
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def fetch_to(self, key: str, dest: Path) -> Path:
        """Download one blob to the local file dest (replaced whole, never half written); returns
        dest. Raises FileNotFoundError when the key holds no blob."""
        name = self.name(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(dest)
        try:
            self._client().download_file(self.bucket, name, str(partial), Config=self.transfer)
        except ClientError as exc:
            partial.unlink(missing_ok=True)
            if _missing(exc):
                raise FileNotFoundError(f"no blob at storage key {key!r}") from None
            raise
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        return dest

    def fetch_tree_to(self, prefix: str, dest: Path) -> Path:
        """Download every blob under prefix into the local directory dest, keeping their relative
        paths (dest is replaced whole); returns dest. Raises FileNotFoundError when the prefix
        holds no blob, StorageKeyError (app.core.storage) for an object whose name under the prefix
        is not a plain relative path."""
        base = f"{self.name(prefix)}/"
        names = list(self._list(base))
        if not names:
            raise FileNotFoundError(f"no blobs under storage prefix {prefix!r}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(dest)
        try:
            for name in names:
                relative = name[len(base):]
                # Written by someone else into the bucket, a name like a/../../x must not escape dest.
                check_key(relative)
                target = partial / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                self._client().download_file(self.bucket, name, str(target), Config=self.transfer)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        replace_tree(partial, dest)
        return dest

    def _list(self, name_prefix: str) -> Iterator[str]:
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                             Prefix=name_prefix):
            for item in page.get("Contents", []):
                yield item["Key"]


class _ObjectReader(io.RawIOBase):
    """An object's body as a seekable file: reads stream the open response; a seek elsewhere
    reopens the object at that offset (a ranged GET of the same ETag). The size is the opened
    object's, so a reader that seeks to the end to learn it gets the size of what it reads."""

    def __init__(self, client: Any, bucket: str, name: str, response: dict[str, Any]) -> None:
        super().__init__()
        self._client, self._bucket, self._name = client, bucket, name
        self._etag: str = response["ETag"]
        self._size = int(response["ContentLength"])
        self._body: Any = response["Body"]
        self._pos = self._body_pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size or len(buffer) == 0:
            return 0
        if self._body is None or self._body_pos != self._pos:
            self._reopen()
        data = self._body.read(len(buffer))
        if not data:
            raise OSError(f"object {self._name!r} ended at byte {self._pos} of {self._size}")
        n = len(data)
        buffer[:n] = data
        self._pos += n
        self._body_pos += n
        return n

    def _reopen(self) -> None:
        if self._body is not None:
            self._body.close()
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._name, IfMatch=self._etag,
                                               Range=f"bytes={self._pos}-")
        except ClientError as exc:
            raise FileNotFoundError(f"object {self._name!r} was replaced or deleted while open") from exc
        self._body, self._body_pos = response["Body"], self._pos

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()

