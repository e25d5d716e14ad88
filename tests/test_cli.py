"""The `tuneforge` command as a new user runs it: in a fresh process, before anything else has run."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.conftest import RUN_ID, create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]


def _tuneforge(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], env=env, cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=120)


def _env(**settings: str) -> dict[str, str]:
    """This process's environment without its Tuneforge settings (the session's database), plus `settings`;
    PYTHONPATH keeps this checkout's code importable from another working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **settings}


def test_models_register_on_a_fresh_embedded_data_dir_creates_the_schema_first(tmp_path, tiny_model):
    env = _env(TUNEFORGE_DATA_DIR=str(tmp_path / "data"))
    registered = _tuneforge("models", "register", "first-model", str(tiny_model), env=env, cwd=tmp_path)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "base model first-model registered" in registered.stdout
    listed = _tuneforge("models", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["first-model"]
    team = _tuneforge("admin", "create-team", "first-team", env=env, cwd=tmp_path)
    assert team.returncode == 0, team.stderr
    assert (tmp_path / "data" / "tuneforge.db").is_file()


def test_a_command_on_an_unmigrated_postgres_says_to_migrate_instead_of_a_traceback(tmp_path, services_env):
    name = f"tuneforge_test_{RUN_ID}_cli_{secrets.token_hex(3)}"
    url = create_database(name)
    try:
        env = _env(TUNEFORGE_DATABASE_URL=url, TUNEFORGE_DATA_DIR=str(tmp_path / "data"))
        for command in (["models", "list"], ["admin", "create-team", "early"]):
            out = _tuneforge(*command, env=env, cwd=tmp_path)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "Traceback" not in out.stderr
            assert "`tuneforge migrate` (alembic upgrade head)" in out.stderr
        migrated = _tuneforge("migrate", env=env, cwd=tmp_path)
        assert migrated.returncode == 0, migrated.stderr
        listed = _tuneforge("models", "list", env=env, cwd=tmp_path)
        assert (listed.returncode, listed.stdout) == (0, "")
    finally:
        drop_database(name)


def test_a_command_on_an_unreachable_database_says_so_in_one_line(tmp_path):
    env = _env(TUNEFORGE_DATABASE_URL="postgresql+psycopg://tuneforge:secret@127.0.0.1:1/tuneforge",
               TUNEFORGE_DATA_DIR=str(tmp_path / "data"))
    out = _tuneforge("models", "list", env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot use the database at postgresql+psycopg://tuneforge:***@127.0.0.1:1/")
    assert "Traceback" not in out.stderr and "secret" not in out.stderr


def test_models_register_and_import_refuse_an_unsafe_name_and_write_nothing(tmp_path, tiny_model):
    data = tmp_path / "data"
    env = _env(TUNEFORGE_DATA_DIR=str(data))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for command in (["models", "register", "../evil", str(tiny_model)], ["models", "register", "a\nb", str(tiny_model)],
                    ["models", "import", "../../evil", str(gguf)]):
        out = _tuneforge(*command, env=env, cwd=tmp_path)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and "is invalid" in out.stderr, out.stderr
    assert not (tmp_path / "evil").exists() and not (data / "evil").exists()
    assert not (data / "models").exists()
    listed = _tuneforge("models", "list", env=env, cwd=tmp_path)
    assert (listed.returncode, listed.stdout) == (0, ""), listed.stderr
