"""A real S3-protocol server for benchmarks, and the settings that put an instance's blobs in it.

moto's standalone server (`moto[server]` from PyPI) on a free port, holding its objects in its own
memory: MinIO's server is neither on PyPI nor packaged by Debian here.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator

from tuneforge import processes

CREDENTIALS = {"region_name": "us-east-1", "aws_access_key_id": "bench", "aws_secret_access_key": "bench"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server, running until the block ends; yields its endpoint URL."""
    port = processes.free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        processes.wait_http(f"{endpoint}/moto-api/", moto, what="the moto S3 server")
        yield endpoint
    finally:
        moto.terminate()
        moto.wait(30)


def bucket_env(endpoint: str) -> dict[str, str]:
    """Settings (TUNEFORGE_*) that select S3 storage in a new bucket of the server at endpoint."""
    import boto3

    bucket = f"bench-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS).create_bucket(Bucket=bucket)
    return {"TUNEFORGE_STORAGE_URL": f"s3://{bucket}/tuneforge", "TUNEFORGE_S3__ENDPOINT_URL": endpoint,
            "TUNEFORGE_S3__REGION": CREDENTIALS["region_name"],
            "TUNEFORGE_S3__ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
            "TUNEFORGE_S3__SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
            "TUNEFORGE_S3__ADDRESSING_STYLE": "path"}
