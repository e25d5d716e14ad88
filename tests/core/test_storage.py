"""Storage keys stay inside their prefix: the storage root, and for teams/<team_id>/... that team's
folder, whatever `..`, absolute parts, NUL or symlinks a key tries."""

from __future__ import annotations

import os

import pytest

from app.core.storage import LocalStorage, StorageKeyError


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    store = LocalStorage(tmp_path / "storage")
    for team in ("team-a", "team-b"):
        (store.root / "teams" / team / "files").mkdir(parents=True)
        (store.root / "teams" / team / "files" / "data.jsonl").write_text("{}\n")
    return store


def test_a_team_key_resolves_inside_the_teams_folder(storage):
    path = storage.path("teams/team-a/files/data.jsonl")
    assert path == storage.root / "teams" / "team-a" / "files" / "data.jsonl"
    assert storage.open("teams/team-a/files/data.jsonl").read() == b"{}\n"


@pytest.mark.parametrize("key", [
    "", "..", "../outside", "teams/team-a/../team-b/files/data.jsonl", "teams/team-a/files/../../team-b/x",
    "./teams/team-a/x", "teams//team-a/x", "teams/team-a/x/",
], ids=["empty", "dotdot", "parent", "into-other-team", "up-and-over", "dot", "empty-part", "trailing-slash"])
def test_a_key_with_dot_parts_is_refused(storage, key):
    with pytest.raises(StorageKeyError, match="invalid storage key"):
        storage.path(key)


@pytest.mark.parametrize("key", ["/etc/passwd", "//etc/passwd", "teams\\team-a\\x", "teams/team-a/x\0.jsonl"],
                         ids=["absolute", "double-slash", "backslash", "nul"])
def test_an_absolute_backslash_or_nul_key_is_refused(storage, key):
    with pytest.raises(StorageKeyError, match="invalid storage key"):
        storage.path(key)


def test_a_symlink_out_of_the_root_is_refused(storage, tmp_path):
    (tmp_path / "secret").write_text("not yours")
    os.symlink(tmp_path / "secret", storage.root / "teams" / "team-a" / "files" / "leak.jsonl")
    with pytest.raises(StorageKeyError, match="escapes its prefix"):
        storage.open("teams/team-a/files/leak.jsonl")


def test_a_symlink_into_another_teams_folder_is_refused(storage):
    os.symlink(storage.root / "teams" / "team-b" / "files" / "data.jsonl",
               storage.root / "teams" / "team-a" / "files" / "theirs.jsonl")
    with pytest.raises(StorageKeyError, match="escapes its prefix teams/team-a"):
        storage.path("teams/team-a/files/theirs.jsonl")


def test_a_team_folder_that_is_a_symlink_to_another_team_is_refused(storage):
    os.symlink(storage.root / "teams" / "team-b", storage.root / "teams" / "team-c")
    with pytest.raises(StorageKeyError, match="escapes its prefix teams/team-c"):
        storage.path("teams/team-c/files/data.jsonl")


def test_writes_through_a_symlinked_folder_are_refused_and_write_nothing(storage, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, storage.root / "teams" / "team-a" / "adapters")
    src = tmp_path / "blob"
    src.write_bytes(b"x")
    with pytest.raises(StorageKeyError):
        storage.put_file(src, "teams/team-a/adapters/a/adapter.tar.gz")
    assert list(outside.iterdir()) == []
    assert list((storage.root / ".tmp").iterdir()) == []


def test_fetch_to_stages_a_blob_into_a_local_file(storage, tmp_path):
    dest = storage.fetch_to("teams/team-a/files/data.jsonl", tmp_path / "stage" / "train.jsonl")
    assert dest.read_bytes() == b"{}\n"
    assert not list(dest.parent.glob(".*partial"))


def test_fetch_to_a_missing_key_raises_and_writes_nothing(storage, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.fetch_to("teams/team-a/files/missing.jsonl", tmp_path / "stage" / "x.jsonl")
    assert not (tmp_path / "stage").exists()


def test_fetch_tree_to_replaces_the_destination_with_the_prefix(storage, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    storage.put_tree(src, "teams/team-a/adapters/ad-1/files")
    dest = tmp_path / "stage" / "ad-1"
    (dest).mkdir(parents=True)
    (dest / "stale.txt").write_text("from an earlier copy")
    storage.fetch_tree_to("teams/team-a/adapters/ad-1/files", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "adapter_config.json", "sub/weights.bin"]
    assert (dest / "sub" / "weights.bin").read_bytes() == b"\x00\x01"


def test_fetch_tree_to_an_empty_prefix_raises(storage, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.fetch_tree_to("teams/team-a/adapters/none", tmp_path / "stage" / "none")


def test_fetch_refuses_a_key_outside_its_prefix(storage, tmp_path):
    with pytest.raises(StorageKeyError):
        storage.fetch_to("teams/team-a/../team-b/files/data.jsonl", tmp_path / "x")
