"""The API process stays small: no torch, transformers, peft or worker code reachable from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "worker")


def test_api_process_imports_no_ml_library():
    code = (
        "import sys, json\n"
        "from app.main import create_app\n"
        "from fastapi.testclient import TestClient\n"
        "app = create_app()\n"
        "TestClient(app).get('/openapi.json')\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_module_under_app_imports_ml_libraries_or_the_worker():
    offenders = []
    for path in (ROOT / "app").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and stripped.split()[1].split(".")[0] in HEAVY:
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert offenders == []


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_file_is_valid():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no docker compose client here (scripts/system-deps.sh installs docker-compose)")
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
