"""Base-model names: one safe path component, checked before the name is used for anything."""

from __future__ import annotations

import pytest

from app.domains.base_models import service as base_models
from app.domains.base_models.errors import InvalidModelName


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m-instruct", "Llama-3.2-1B", "q_2.5", "x" * 128])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert base_models.check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../evil", "a/b", "a\\b", "a..b", ".hidden", "-flag", "a\nb", "ok\n",
                                  "a\x00b", "a:b", "a b", "x" * 129])
def test_unsafe_names_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidModelName) as caught:
        base_models.check_name(name)
    assert caught.value.param == "name" and caught.value.status_code == 400


def test_register_refuses_an_unsafe_name_before_reading_the_directory(tmp_path) -> None:
    # No session is needed: the name is refused before anything is read or written.
    with pytest.raises(InvalidModelName):
        base_models.register(None, name="../evil", path=tmp_path)  # type: ignore[arg-type]


def test_a_model_registered_into_storage_is_staged_from_there_and_a_rollback_deletes_its_files(
        private_database, tiny_model, tmp_path) -> None:
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from worker.staging import stage_base

    with session_scope() as session:
        row = base_models.register(session, name="stored-tiny", path=tiny_model, storage=get_storage())
        recorded = row.path
    assert recorded.startswith(base_models.STORED + "models/stored-tiny/rev-")
    staged = stage_base(recorded)
    assert staged != tiny_model and (staged / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    assert stage_base(str(tiny_model)) == tiny_model  # a model registered where it is stays there

    with pytest.raises(RuntimeError), session_scope() as session:
        row = base_models.register(session, name="rolled-back", path=tiny_model, storage=get_storage())
        prefix = row.path.removeprefix(base_models.STORED)
        assert get_storage().exists(prefix)
        raise RuntimeError("the transaction fails after the files were stored")
    assert not get_storage().exists(prefix)


def test_pool_processes_staging_one_model_at_once_each_read_it_whole(private_database, tiny_model) -> None:
    # Two jobs on one base start together: a copy half written, or replaced while the other loads
    # it, gave a 4-bit layer without its weights ('Parameter' object has no attribute 'quant_state').
    from concurrent.futures import ThreadPoolExecutor

    from app.core.db import session_scope
    from app.core.storage import get_storage
    from worker.staging import stage_base

    with session_scope() as session:
        recorded = base_models.register(session, name="staged-at-once", path=tiny_model, storage=get_storage()).path
    want = {p.name: p.read_bytes() for p in tiny_model.iterdir()}

    def stage_and_read(_: int) -> tuple[int, dict[str, bytes]]:
        staged = stage_base(recorded)
        return staged.stat().st_ino, {p.name: p.read_bytes() for p in staged.iterdir()}

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(stage_and_read, range(12)))
    assert all(files == want for _, files in results)
    assert len({inode for inode, _ in results}) == 1  # staged once, never replaced under a reader
    staged = stage_base(recorded)
    assert [p.name for p in staged.parent.iterdir()] == [staged.name]  # no partial copy left
